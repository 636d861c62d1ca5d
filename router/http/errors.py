"""OpenAI error objects: what the frontend and backend raise, as HTTP statuses.

Every failure answers ``{"error": {"message", "type", "param", "code"}}`` (the shape the OpenAI SDKs
parse into ``openai.APIStatusError.body``):

    400 invalid_request_error   a field the Frontend or the body schema rejects; ``param`` names it
    401 invalid_request_error   a missing or unknown API key (code ``invalid_api_key``)
    404 invalid_request_error   a ``model`` this server does not serve (code ``model_not_found``)
    413 invalid_request_error   a body over ``RequestLimits.max_message_bytes``
    429 rate_limit_error        the admission queue is full; ``Retry-After`` (s) and ``retry-after-ms``
    503 service_unavailable     no healthy worker
    500 server_error            an engine failure or a bug
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.backend import AdmissionError, BackendUnavailable
from workers.engine.types import RequestError

log = logging.getLogger(__name__)


class APIError(Exception):
    """A failure with its HTTP status and OpenAI error fields (``headers``: e.g. Retry-After)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def to_api_error(exc: BaseException) -> APIError:
    """Map what the frontend and backend raise to an ``APIError`` (anything unexpected: 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return APIError(400, str(exc), param=exc.field)
    if isinstance(exc, AdmissionError):
        wait = max(exc.retry_after_s, 0.0)
        headers = {"Retry-After": str(max(1, math.ceil(wait))), "retry-after-ms": str(max(1, round(wait * 1000)))}
        return APIError(429, f"{exc}; retry after {wait:g} s", type="rate_limit_error",
                        code="rate_limit_exceeded", headers=headers)
    if isinstance(exc, BackendUnavailable):
        return APIError(503, str(exc) or "no healthy worker", type="service_unavailable")
    log.exception("request failed", exc_info=exc)
    return APIError(500, f"{type(exc).__name__}: {exc}", type="server_error")


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The 400 for a body that fails its schema (pydantic's ``errors()``), naming the first bad field."""
    first = errors[0] if errors else {}
    # An endpoint's loc is ("body", "field", ...): the param is the field path without the "body" root.
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        message = f"{param}: unknown parameter"
    elif first.get("type") == "json_invalid":
        message, param = "the body is not valid JSON", None
    else:
        message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
    return APIError(400, message, param=param)


def engine_error(message: str | None) -> APIError:
    """A request the engine finished with reason ``"error"``."""
    return APIError(500, message or "the engine failed the request", type="server_error")


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over {limit} bytes", param=None, code="request_too_large")


def install_handlers(app: Any) -> None:
    """Answer every error of ``app`` with an OpenAI error object."""

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    async def invalid_body(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error(exc.errors()).response()

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), type=kind, code=code,
                        headers=dict(exc.headers or {})).response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestError, api_error)
    app.add_exception_handler(AdmissionError, api_error)
    app.add_exception_handler(BackendUnavailable, api_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, api_error)
