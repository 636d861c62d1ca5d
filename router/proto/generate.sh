#!/usr/bin/env bash
# Regenerate the committed Python code (*_pb2.py, *_pb2.pyi, *_pb2_grpc.py) of
# router/proto/dsaserve/v1/dsaserve.proto. Needs grpcio-tools==1.85.1 in $PYTHON (default: the
# repository's .venv, else python3). The generated code requires grpcio>=1.85.1 and protobuf>=7.35.1
# at run time, as pyproject.toml declares: change those pins together with the tools' version.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
  python="$(command -v "$PYTHON")"
elif [[ -x "$repo/.venv/bin/python" ]]; then
  python="$repo/.venv/bin/python"
else
  python="$(command -v python3)"
fi
cd "$here"
"$python" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  dsaserve/v1/dsaserve.proto
# protoc writes "from dsaserve.v1 import dsaserve_pb2", which resolves only with router/proto on
# sys.path; a relative import makes router.proto.dsaserve.v1 importable from anywhere.
sed -i 's/^from dsaserve\.v1 import dsaserve_pb2 as/from . import dsaserve_pb2 as/' \
  dsaserve/v1/dsaserve_pb2_grpc.py
# The generated classes record their module as "dsaserve.v1.dsaserve_pb2"; pickling them (Ray Serve's
# gRPC proxy ships requests to replicas by pickle) needs the importable path.
sed -i "s/'dsaserve\.v1\.dsaserve_pb2'/'router.proto.dsaserve.v1.dsaserve_pb2'/" dsaserve/v1/dsaserve_pb2.py
