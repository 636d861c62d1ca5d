"""The gRPC server: ``dsaserve.v1.DsaServe`` on a ``Frontend``, plus health and reflection.

Statuses (see the .proto): INVALID_ARGUMENT with "FIELD: limit" details and the field in the
``dsaserve-field`` trailing metadata; RESOURCE_EXHAUSTED with ``grpc-retry-pushback-ms``;
UNAVAILABLE; DEADLINE_EXCEEDED. Every call runs its request under ``aclosing``, so a cancelled call, a
passed deadline or a stop string closes the backend's iterator, which aborts the request and frees
its KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import os
import uuid
import weakref
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from router import wire
from router.backend import AdmissionError, Backend, BackendUnavailable, health_problem
from router.chat import render_chat
from router.frontend import Completion, CompletionRequest, Frontend
from router.proto.dsaserve.v1 import dsaserve_pb2 as pb
from router.proto.dsaserve.v1 import dsaserve_pb2_grpc as pb_grpc
from router.tls import TLSConfig, server_credentials
from router.tokenizer import Tokenizer
from workers.engine.types import RequestError

if TYPE_CHECKING:
    from router.jobs.service import JobService

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DsaServe"].full_name
JOBS_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BatchJobs"].full_name
DEFAULT_BATCH_CONCURRENCY = 64
MAX_BATCH_RETRY_WAIT_S = 1.0
HEALTH_POLL_S = 0.5
_PORTS: weakref.WeakKeyDictionary[grpc.aio.Server, int] = weakref.WeakKeyDictionary()
_HEALTH_TASKS: weakref.WeakKeyDictionary[grpc.aio.Server, asyncio.Task] = weakref.WeakKeyDictionary()


class CallError(Exception):
    """A failure to report as a gRPC status (or as a batch response's error)."""

    def __init__(self, info: wire.ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info


def to_call_error(exc: BaseException) -> CallError:
    """Map what the frontend and backend raise to a status (unexpected errors: INTERNAL)."""
    if isinstance(exc, CallError):
        return exc
    if isinstance(exc, RequestError):
        return CallError(wire.ErrorInfo("INVALID_ARGUMENT", str(exc), exc.field))
    if isinstance(exc, AdmissionError):
        msg = f"{exc}; retry after {exc.retry_after_s:g} s"
        return CallError(wire.ErrorInfo("RESOURCE_EXHAUSTED", msg, retry_after_s=exc.retry_after_s))
    if isinstance(exc, BackendUnavailable):
        return CallError(wire.ErrorInfo("UNAVAILABLE", str(exc) or "no healthy worker"))
    if isinstance(exc, TimeoutError):
        return CallError(wire.ErrorInfo("DEADLINE_EXCEEDED", "deadline exceeded; the request was aborted"))
    log.exception("request failed", exc_info=exc)
    return CallError(wire.ErrorInfo("INTERNAL", f"{type(exc).__name__}: {exc}"))


class DsaServeServicer(pb_grpc.DsaServeServicer):
    """Implements the RPCs on a ``Frontend``; ``batch_concurrency`` bounds one GenerateBatch call's
    requests in flight (and its buffered responses)."""

    def __init__(self, frontend: Frontend, *, batch_concurrency: int = DEFAULT_BATCH_CONCURRENCY,
                 api_keys: frozenset[str] | None = None) -> None:
        self.frontend = frontend
        self.batch_concurrency = batch_concurrency
        # Clients send "authorization: Bearer KEY" when keys are configured ($DSASERVE_API_KEYS).
        self.api_keys = api_keys if api_keys is not None else api_keys_from_env()

    async def _authorize(self, context) -> None:
        if not self.api_keys:
            return
        if not api_key_matches(_presented_key(context), self.api_keys):
            await _abort(context, wire.ErrorInfo("UNAUTHENTICATED", "missing or unknown API key (metadata authorization: Bearer KEY)"))

    async def caller_key(self, context) -> str:
        """The API key a call presents ("" without keys configured); aborts UNAUTHENTICATED when it is
        not one of them."""
        await self._authorize(context)
        return _presented_key(context) if self.api_keys else ""

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        await self._authorize(context)
        req = self._request(request, context)
        try:
            async with asyncio.timeout(context.time_remaining()):
                async with aclosing(self.frontend.generate(req)) as deltas:
                    if request.stream:
                        async for delta in deltas:
                            _raise_on_engine_error(delta.finish_reason, delta.error)
                            await context.write(wire.delta_to_proto(delta))
                    else:
                        completion = Completion.from_deltas([d async for d in deltas])
                        _raise_on_engine_error(completion.finish_reason, completion.error)
                        await context.write(wire.completion_to_proto(completion))
        except Exception as exc:  # noqa: BLE001 — every failure becomes a status
            error = to_call_error(exc)
        else:
            return
        await _abort(context, error.info)

    async def GenerateBatch(
        self, request_iterator: AsyncIterator[pb.GenerateRequest], context: grpc.aio.ServicerContext
    ) -> None:
        await self._authorize(context)
        # Bounded both ways: at most `batch_concurrency` requests run, and a finished one holds its
        # slot until its response is queued, so a client that stops reading stops the intake.
        results: asyncio.Queue[pb.GenerateResponse | BaseException | None] = asyncio.Queue(self.batch_concurrency)
        slots = asyncio.Semaphore(self.batch_concurrency)
        running: set[asyncio.Task] = set()

        async def run_one(msg: pb.GenerateRequest) -> None:
            try:
                await results.put(await self._batch_one(msg, context))
            finally:
                slots.release()

        async def read_all() -> None:
            try:
                async for msg in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(run_one(msg))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.wait(set(running))
                await results.put(None)
            except Exception as exc:  # noqa: BLE001 — handed to the writer, which reports it
                await results.put(exc)

        reader = asyncio.create_task(read_all())
        error: CallError | None = None
        try:
            async with asyncio.timeout(context.time_remaining()):
                while (item := await results.get()) is not None:
                    if isinstance(item, BaseException):
                        error = to_call_error(item)
                        break
                    await context.write(item)
        except TimeoutError as exc:
            error = to_call_error(exc)
        finally:
            # Cancelling a request's task closes its backend iterator: the request is aborted.
            for task in (reader, *running):
                task.cancel()
        if error is not None:
            await _abort(context, error.info)

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        await self._authorize(context)
        add_bos = request.add_bos if request.HasField("add_bos") else None
        try:
            if request.HasField("messages"):
                ids = await self._tokenize_chat(request)
            else:
                ids = await self.frontend.tokenize_async(request.text, add_bos=add_bos)
        except RequestError as exc:
            await _abort(context, to_call_error(exc).info)
        return pb.TokenizeResponse(token_ids=ids)

    async def _tokenize_chat(self, request: pb.TokenizeRequest) -> list[int]:
        """The ids Generate would give the same chat: rendered (BOS included as text), then encoded
        with no added BOS. Errors name "messages"."""
        if request.text:
            raise RequestError("messages", "give either text or messages, not both")
        messages, thinking = wire.chat_from_proto(request.messages)
        text = render_chat(messages, thinking=thinking)
        try:
            return await self.frontend.tokenize_async(text, add_bos=False)
        except RequestError as exc:
            raise RequestError("messages", str(exc).removeprefix(f"{exc.field}: ")) from None

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        await self._authorize(context)
        return pb.ListModelsResponse(models=[wire.model_to_proto(self.frontend.info)])

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        await self._authorize(context)
        # Cluster backends gather stats over the network: off the event loop.
        return wire.status_to_proto(await asyncio.to_thread(self.frontend.backend.stats))

    def _request(self, msg: pb.GenerateRequest, context) -> CompletionRequest:
        """The typed request, with the caller's tenant (its API key, when keys are configured) so
        that the prefix cache is isolated per tenant."""
        req = wire.request_from_proto(msg)
        if self.api_keys:
            req = dataclasses.replace(req, tenant=_presented_key(context))
        return req

    async def _batch_one(self, msg: pb.GenerateRequest, context) -> pb.GenerateResponse:
        """One batch request to its final response; failures become error responses. A full queue
        is waited out: a batch trades latency for throughput."""
        req = self._request(msg, context)
        req = dataclasses.replace(req, request_id=req.request_id or uuid.uuid4().hex)
        while True:
            try:
                completion = await self.frontend.complete(req)
            except AdmissionError as exc:
                await asyncio.sleep(min(max(exc.retry_after_s, 0.01), MAX_BATCH_RETRY_WAIT_S))
                continue
            except Exception as exc:  # noqa: BLE001 — reported in the response
                return wire.error_to_proto(req.request_id, to_call_error(exc).info)
            if completion.finish_reason == "error":
                completion = dataclasses.replace(completion, error=completion.error or "the engine failed the request")
            return wire.completion_to_proto(completion)


async def start_server(
    backend: Backend,
    tokenizer: Tokenizer | None,
    host: str = "127.0.0.1",
    port: int = 50051,
    *,
    batch_concurrency: int | None = None,
    tls: TLSConfig | None = None,
    jobs: JobService | None = None,
) -> grpc.aio.Server:
    """Start serving ``DsaServe``, ``grpc.health.v1.Health`` (SERVING while ``backend.health()`` is
    None, NOT_SERVING otherwise, polled every ``HEALTH_POLL_S``) and server reflection.

    ``port`` 0 picks a free port; ``server_port(server)`` tells which. With ``tls`` the port speaks
    TLS only (mutual TLS when it names a client CA). With ``jobs``, ``dsaserve.v1.BatchJobs`` too (the
    caller starts and closes the service). The caller stops the server
    (``await server.stop(grace)``) and closes the backend.

    Raises:
        TLSError: a TLS file is missing or unusable (names it).
        OSError: the address cannot be bound.
    """
    frontend = Frontend(backend, tokenizer)
    concurrency = batch_concurrency or max(1, min(DEFAULT_BATCH_CONCURRENCY, frontend.info.max_queue))
    limits = frontend.info.limits
    # Past maximum_concurrent_rpcs gRPC itself answers RESOURCE_EXHAUSTED; a larger message is refused
    # before it is parsed.
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limits.max_message_bytes)],
        maximum_concurrent_rpcs=limits.max_concurrent_streams or None,
    )
    servicer = DsaServeServicer(frontend, batch_concurrency=concurrency)
    pb_grpc.add_DsaServeServicer_to_server(servicer, server)
    services = [SERVICE_NAME]
    if jobs is not None:
        from router.jobs.grpc_service import BatchJobsServicer

        pb_grpc.add_BatchJobsServicer_to_server(BatchJobsServicer(jobs, servicer.caller_key), server)
        services.append(JOBS_SERVICE_NAME)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, server_credentials(tls)) if tls else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    problem = await health_problem(backend)
    await _set_health(health_servicer, problem)
    await server.start()
    _PORTS[server] = bound
    _HEALTH_TASKS[server] = asyncio.create_task(_watch_health(server, backend, health_servicer, problem))
    return server


async def _set_health(servicer: health.aio.HealthServicer, problem: str | None) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if problem is None else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


async def _watch_health(server: grpc.aio.Server, backend: Backend, servicer: health.aio.HealthServicer,
                        last: str | None) -> None:
    """Keep the health service's answer equal to the backend's readiness until the server stops."""
    while await server.wait_for_termination(HEALTH_POLL_S):  # True: timed out, still running
        problem = await health_problem(backend)
        if problem != last:
            if problem is not None:
                log.warning("not serving: %s", problem)
            await _set_health(servicer, problem)
            last = problem


def api_keys_from_env() -> frozenset[str]:
    """API keys from ``$DSASERVE_API_KEYS`` (comma or newline separated); empty: no authentication."""
    raw = os.environ.get("DSASERVE_API_KEYS", "")
    return frozenset(k.strip() for k in raw.replace("\n", ",").split(",") if k.strip())


def bearer_key(authorization: str) -> str:
    """The key of an ``authorization: Bearer KEY`` value (gRPC metadata or HTTP header), "" when none."""
    return authorization.removeprefix("Bearer ").strip()


def api_key_matches(presented: str, keys: frozenset[str]) -> bool:
    """Whether ``presented`` is one of ``keys``: constant time per key, and every key is compared, so
    timing tells nothing about the keys."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented.encode(), key.encode())
    return matched


def _presented_key(context) -> str:
    """The API key a call presents (``authorization: Bearer KEY``), "" when none."""
    return bearer_key(dict(context.invocation_metadata() or ()).get("authorization", ""))


def server_port(server: grpc.aio.Server) -> int:
    """The port a server from ``start_server`` listens on."""
    return _PORTS[server]


def _raise_on_engine_error(finish_reason: str | None, error: str | None) -> None:
    if finish_reason == "error":
        raise CallError(wire.ErrorInfo("INTERNAL", error or "the engine failed the request"))


async def _abort(context: grpc.aio.ServicerContext, info: wire.ErrorInfo) -> None:
    """End the call with ``info`` as its status (raises, as ``context.abort`` does)."""
    metadata: list[tuple[str, str]] = []
    if info.field:
        metadata.append((wire.FIELD_KEY, info.field))
    if info.retry_after_s is not None:
        metadata.append((wire.RETRY_PUSHBACK_KEY, str(max(1, round(info.retry_after_s * 1000)))))
    await context.abort(getattr(grpc.StatusCode, info.code), info.message, trailing_metadata=tuple(metadata))
