"""The OpenAI-compatible HTTP API: ``build_app`` (FastAPI, ``router.http.app``) and
``start_http_server`` (uvicorn on the caller's event loop, ``router.http.serve``).

Loaded on first use, so that ``router.jobs`` can use the request conversion (``router.http.convert``)
without importing the app, which itself serves the jobs."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["HTTPServer", "build_app", "start_http_server"]
_WHERE = {"build_app": "router.http.app", "HTTPServer": "router.http.serve", "start_http_server": "router.http.serve"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'router.http' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
