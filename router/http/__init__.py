"""The OpenAI-compatible HTTP API: ``build_app`` (FastAPI, ``router.http.app``) and
``start_http_server`` (uvicorn on the caller's event loop, ``router.http.serve``)."""

from router.http.app import build_app
from router.http.serve import HTTPServer, start_http_server

__all__ = ["HTTPServer", "build_app", "start_http_server"]
