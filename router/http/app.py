"""The OpenAI-compatible HTTP API on a ``Frontend``: a FastAPI app.

    GET  /v1/models               the served model (id, owned_by "dsaserve", max_model_len)
    GET  /v1/models/{model}
    POST /v1/completions          prompt: text or token ids; SSE with "stream": true
    POST /v1/chat/completions     messages (router.chat), DeepSeek thinking switch; SSE likewise
    GET  /health                  200 while backend.health() is None, else 503 (no API key needed)
    GET  /metrics                 Prometheus text (router.metrics, when present)
    GET  /openapi.json, /docs

Requests go through the same ``Frontend`` as the gRPC API, so limits, tokenization, stop strings and
errors are the same; errors are OpenAI error objects (``router.http.errors``). With API keys
(``$DSASERVE_API_KEYS``) every /v1 call needs ``Authorization: Bearer KEY``, compared in constant
time, and the key is the request's tenant (its prefix cache is its own), as in ``router.server``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from router.backend import health_problem
from router.frontend import CompletionRequest, Frontend
from router.http.batch_api import add_batch_routes
from router.http.convert import chat_request, completion_request, openai_names
from router.http.errors import APIError, body_too_large, install_handlers
from router.http.openai_types import ChatCompletionBody, CompletionBody
from router.http.responses import ResponseFormat, event_stream
from router.jobs.service import JobService
from router.server import api_key_matches, api_keys_from_env, bearer_key


def build_app(frontend: Frontend, *, api_keys: frozenset[str] | None = None,
              served_model: str | None = None, jobs: JobService | None = None) -> FastAPI:
    """The app serving ``frontend``.

    Args:
        frontend: validates and runs requests (shared with the gRPC server or not).
        api_keys: accepted keys; None reads ``$DSASERVE_API_KEYS``; empty: no authentication.
        served_model: the model id clients name (default: the backend's ``model_id``).
        jobs: serve the OpenAI Batch API (``router.http.batch_api``) on these jobs.
    """
    if api_keys is None:
        api_keys = api_keys_from_env()
    info = frontend.info
    model_id = served_model or info.model_id
    app = FastAPI(title="dsaserve OpenAI-compatible API", version="1",
                  description="OpenAI completions and chat completions served by dsaserve.")
    install_handlers(app)
    uploads = {"/v1/files": jobs.limits.max_file_bytes + 65536} if jobs is not None else {}  # + the form's framing
    app.add_middleware(BodyLimit, max_bytes=info.limits.max_message_bytes, path_limits=uploads)

    async def authorize(request: Request) -> None:
        """Sets ``request.state.tenant``: the caller's key when keys are configured (401 unless it is
        one of them). A dependency, so it runs before the body is validated."""
        request.state.tenant = None
        if not api_keys:
            return
        presented = bearer_key(request.headers.get("authorization", ""))
        if not api_key_matches(presented, api_keys):
            raise APIError(401, "missing or unknown API key (header Authorization: Bearer KEY)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        request.state.tenant = presented

    v1 = {"dependencies": [Depends(authorize)]}

    def check_model(name: str | None) -> None:
        if name and name != model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_id!r}",
                           param="model", code="model_not_found")

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "dsaserve",
                "max_model_len": info.max_context}

    @app.get("/v1/models", **v1)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}", **v1)
    async def get_model(model: str) -> dict[str, Any]:
        check_model(model)
        return model_card()

    @app.post("/v1/completions", **v1)
    async def completions(body: CompletionBody, request: Request) -> Response:
        check_model(body.model)
        c = completion_request(body, frontend, model_id, request.state.tenant)
        return await _respond(frontend, c.request, c.format, bool(body.stream), c.names)

    @app.post("/v1/chat/completions", **v1)
    async def chat_completions(body: ChatCompletionBody, request: Request) -> Response:
        check_model(body.model)
        c = await chat_request(body, frontend, model_id, request.state.tenant)
        return await _respond(frontend, c.request, c.format, bool(body.stream), c.names)

    if jobs is not None:
        add_batch_routes(app, jobs, v1)

    @app.get("/health")
    async def health() -> Response:
        problem = await health_problem(frontend.backend)
        if problem is None:
            return JSONResponse({"status": "ok"})
        return APIError(503, problem, type="service_unavailable").response()

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        try:
            from router.metrics import render
        except ImportError:
            raise APIError(404, "metrics are not available in this build", code="not_found") from None
        data, content_type = await asyncio.to_thread(render, frontend.backend)
        return Response(data, media_type=content_type)

    return app


async def _respond(frontend: Frontend, req: CompletionRequest, fmt: ResponseFormat, stream: bool,
                   names: dict[str, str]) -> Response:
    """Run ``req``: a JSON body, or an SSE stream once the first delta exists (so that admission
    and validation errors still get their HTTP status)."""
    if not stream:
        with openai_names(names):
            completion = await frontend.complete(req)
        return JSONResponse(fmt.whole(completion))
    deltas = frontend.generate(req)
    try:
        with openai_names(names):
            first = await deltas.__anext__()
    except BaseException:
        await deltas.aclose()
        raise
    return StreamingResponse(event_stream(first, deltas, fmt), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` (or its path's entry in ``path_limits``: file
    uploads) gets 413 before any of it is parsed (declared by Content-Length, or counted as it arrives)."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int,
                 path_limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = path_limits or {}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.path_limits.get(scope.get("path", ""), self.max_bytes)
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await body_too_large(max_bytes).response()(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > max_bytes:
                await body_too_large(max_bytes).response()(scope, receive, send)
                return
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: disconnect notices
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
