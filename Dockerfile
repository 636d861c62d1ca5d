# syntax=docker/dockerfile:1
# The image the Helm chart runs (helm/dsaserve: image.repository / image.tag): a CUDA Ray base image
# with dsaserve installed, running as the base image's non-root `ray` user (uid 1000, gid 100).
#
#   docker build -t REGISTRY/dsaserve:0.1.0 .
#   docker build --build-arg RAY_VERSION=2.60.0 --build-arg CUDA=cu128 -t REGISTRY/dsaserve:0.1.0-cu128 .
#
# RAY_VERSION must match the ray[serve] pin in pyproject.toml and the chart's rayVersion.
ARG RAY_VERSION=2.60.0
ARG PYTHON=py311
ARG CUDA=cu128
FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-${CUDA}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    DSASERVE_CACHE=/home/ray/.cache/dsaserve

WORKDIR /home/ray/dsaserve

# Metadata first: the dependency layer is rebuilt only when pyproject.toml changes. On Linux x86_64 the
# torch requirement resolves to PyPI's CUDA build; nixl brings its CUDA 12 and 13 plugins.
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 cluster ./cluster
COPY --chown=1000:100 workers ./workers
COPY --chown=1000:100 router ./router
COPY --chown=1000:100 kvstore ./kvstore
RUN pip install . && mkdir -p "$DSASERVE_CACHE"

USER 1000:100
EXPOSE 50051 8000 8080
# KubeRay replaces the command with `ray start`; run alone, the image serves local mode.
CMD ["dsaserve", "local", "--host", "0.0.0.0", "--port", "50051"]
