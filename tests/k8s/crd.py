"""The KubeRay CRDs as JSON schemas: reference data read from ``../shared/data/kuberay/`` (or
``$DSASERVE_KUBERAY_CRDS``), never copied into the project; tests skip with the reason where absent."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

CRD_ENV = "DSASERVE_KUBERAY_CRDS"
DEFAULT_CRD_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "kuberay"


def crd_dir() -> Path:
    return Path(os.environ.get(CRD_ENV) or DEFAULT_CRD_DIR)


def _strict(schema: dict) -> dict:
    """The API server's strict field validation as JSON schema: an object schema with ``properties``
    and no ``additionalProperties`` rejects unknown fields; ``nullable`` admits null."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        if schema.pop("nullable", False) and "type" in schema:
            schema["type"] = [schema["type"], "null"]
    elif isinstance(schema, list):
        schema = [_strict(s) for s in schema]
    return schema


@functools.lru_cache(maxsize=None)
def _validator(kind_file: str) -> jsonschema.protocols.Validator:
    path = crd_dir() / kind_file
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB: C parser
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def crd_available() -> bool:
    return (crd_dir() / "ray.io_rayservices.yaml").is_file()


def rayservice_validator() -> jsonschema.protocols.Validator:
    """A validator for ray.io/v1 RayService, or a pytest skip that says why there is none."""
    path = crd_dir() / "ray.io_rayservices.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay CRD not found at {path} (reference data from ../shared/data/kuberay/; "
                    f"set ${CRD_ENV} to a folder holding ray.io_rayservices.yaml)")
    return _validator("ray.io_rayservices.yaml")


def crd_errors(doc: dict, *, partial: bool = False) -> list[str]:
    """Every violation of the RayService CRD schema in ``doc``, as "path: message". ``partial``: ``doc``
    is a merge patch, whose fields must be valid but may leave required ones out."""
    validator = rayservice_validator()
    return [f"{'/'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)
            if not (partial and e.validator == "required")]
