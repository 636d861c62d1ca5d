"""Python clients of the dsaserve gRPC API: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

    with Client("127.0.0.1:50051") as c:
        out = c.generate(prompt="Hello", max_tokens=16)           # Completion
        for delta in c.generate_stream(prompt_ids=[0, 42], max_tokens=8):
            print(delta.text, end="")
        for r in c.generate_batch([{"id": "a", "prompt": "Hi", "max_tokens": 4}, ...]):
            print(r.request_id, r.completion or r.error)

Sampling keywords are ``SamplingParams``' fields (max_tokens, temperature, top_p, top_k, seed,
stop_token_ids, stop, ignore_eos, logprobs) plus request_id, cache_salt and priority. A failed call
raises ``DsaServeError`` with the gRPC code, the offending field and the message.

TLS: ``Client(addr, tls_ca="ca.crt")`` verifies the server against that CA bundle; add
``tls_cert``/``tls_key`` for mutual TLS and ``tls_server_name`` when the certificate names another
host than the address (e.g. an IP address or a port-forward).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router import wire
from router.backend import ModelInfo
from router.frontend import Completion, CompletionRequest, Delta
from router.jobs.client import JobsClient
from router.proto.dsaserve.v1 import dsaserve_pb2 as pb
from router.proto.dsaserve.v1 import dsaserve_pb2_grpc as pb_grpc
from router.tls import ClientTLS
from workers.engine.types import RequestError


class DsaServeError(Exception):
    """A failed call: ``code`` (grpc.StatusCode), ``field`` (the bad request field, if any),
    ``message``, and ``retry_after_s`` (set on RESOURCE_EXHAUSTED)."""

    def __init__(
        self, code: grpc.StatusCode, message: str, field: str | None = None, retry_after_s: float | None = None
    ):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> DsaServeError:
        details = err.details() or ""
        field, retry_after_s = wire.error_facts(err.code().name, details, dict(err.trailing_metadata() or ()))
        return cls(err.code(), details, field, retry_after_s)

    @classmethod
    def from_info(cls, info: wire.ErrorInfo) -> DsaServeError:
        code = getattr(grpc.StatusCode, info.code, grpc.StatusCode.UNKNOWN)
        return cls(code, info.message, info.field, info.retry_after_s)


@dataclass(frozen=True)
class BatchResult:
    """One request's outcome in ``generate_batch``: a completion, or the error that stopped it."""

    request_id: str
    completion: Completion | None
    error: DsaServeError | None = None


def make_request(
    prompt: str | None = None, prompt_ids: Iterable[int] | None = None, **kwargs: Any
) -> CompletionRequest:
    """A ``CompletionRequest`` from keywords: the sampling fields, request_id, cache_salt, priority.

    Raises:
        DsaServeError: INVALID_ARGUMENT for an unknown keyword or a value of the wrong type (values
            themselves are checked by the server).
    """
    d = {k: v for k, v in kwargs.items() if v is not None}
    d["prompt"] = prompt
    d["prompt_ids"] = list(prompt_ids) if prompt_ids is not None else None
    for key in ("stop", "stop_token_ids"):
        if key in d and not isinstance(d[key], str):
            d[key] = list(d[key])
    return _from_json(d)


def _from_json(d: Mapping[str, Any]) -> CompletionRequest:
    try:
        return CompletionRequest.from_json(d)
    except RequestError as e:
        raise DsaServeError(grpc.StatusCode.INVALID_ARGUMENT, str(e), e.field) from None


class _BatchFeed:
    """Turns batch items into request messages as gRPC pulls them. An item that cannot be encoded (an
    unknown key, a value of the wrong type) is not sent: it becomes an INVALID_ARGUMENT result of its
    own, as the server would report a bad request, and the other items go on."""

    def __init__(self) -> None:
        self.rejected: deque[BatchResult] = deque()  # appended by gRPC's sender thread, drained by the reader

    def _encode(self, item: CompletionRequest | Mapping[str, Any]) -> pb.GenerateRequest | None:
        if isinstance(item, CompletionRequest):
            return wire.request_to_proto(item)
        try:
            return wire.request_to_proto(_from_json(item))
        except DsaServeError as e:
            rid = item.get("request_id", item.get("id")) if isinstance(item, Mapping) else None
            self.rejected.append(BatchResult("" if rid is None else str(rid), None, e))
            return None

    def messages(self, items: Iterable[CompletionRequest | Mapping[str, Any]]) -> Iterator[pb.GenerateRequest]:
        for item in items:
            if (msg := self._encode(item)) is not None:
                yield msg

    async def amessages(
        self, items: AsyncIterable[CompletionRequest | Mapping[str, Any]]
    ) -> AsyncIterator[pb.GenerateRequest]:
        async for item in items:
            if (msg := self._encode(item)) is not None:
                yield msg

    def drain(self) -> list[BatchResult]:
        out = []
        while self.rejected:
            out.append(self.rejected.popleft())
        return out


def _batch_result(msg: pb.GenerateResponse) -> BatchResult:
    info = wire.error_from_proto(msg)
    if info is not None:
        return BatchResult(msg.request_id, None, DsaServeError.from_info(info))
    return BatchResult(msg.request_id, Completion.from_deltas([wire.delta_from_proto(msg)]))


def _open_channel(grpc_module: Any, address: str, tls: ClientTLS | None) -> Any:
    """A plaintext channel, or a TLS one (``grpc`` or ``grpc.aio``: the same calls on both)."""
    if tls is None:
        return grpc_module.insecure_channel(address)
    return grpc_module.secure_channel(address, tls.credentials(), options=tls.options())


class Client:
    """Blocking client over one channel. ``timeout`` (seconds) is every call's deadline unless a call
    passes its own; ``tls_ca`` (a CA bundle; or ``tls_cert`` alone: the system's roots) makes the
    channel TLS, ``tls_cert``/``tls_key`` present a client certificate (mutual TLS).

    Raises:
        TLSError: a TLS file is missing or unusable, or a certificate is given without its key.
    """

    def __init__(self, address: str, *, timeout: float | None = None, api_key: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 tls_server_name: str | None = None) -> None:
        self.address = address
        self.timeout = timeout
        key = api_key if api_key is not None else os.environ.get("DSASERVE_API_KEY")
        self._metadata = (("authorization", f"Bearer {key}"),) if key else None
        tls = ClientTLS.from_options(tls_ca, tls_cert, tls_key, tls_server_name)
        self._channel = _open_channel(grpc, address, tls)
        self._stub = pb_grpc.DsaServeStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def jobs(self) -> JobsClient:
        """Durable batch jobs on this server (``router.jobs.client``)."""
        return JobsClient(self._channel, self._metadata, self.timeout, DsaServeError, _from_json)

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any) -> Completion:
        """Run one request to the end."""
        return Completion.from_deltas(list(self._stream(prompt, False, timeout, kwargs)))

    def generate_stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> Iterator[Delta]:
        """Deltas of one request as they are produced; the last is finished. Stopping early cancels
        the call, which aborts the request."""
        return self._stream(prompt, True, timeout, kwargs)

    def generate_batch(
        self, requests: Iterable[CompletionRequest | Mapping[str, Any]], *, timeout: float | None = None
    ) -> Iterator[BatchResult]:
        """Results of many requests, in completion order (match them by ``request_id``)."""
        feed = _BatchFeed()
        call = self._stub.GenerateBatch(feed.messages(requests), timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            for r in call:
                yield from feed.drain()
                yield _batch_result(r)
            yield from feed.drain()  # the sender is done once the server has ended the stream
        except grpc.RpcError as e:
            raise DsaServeError.from_rpc_error(e) from None
        finally:
            call.cancel()

    def tokenize(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        msg = pb.TokenizeRequest(text=text, add_bos=add_bos) if add_bos is not None else pb.TokenizeRequest(text=text)
        return list(self._unary(self._stub.Tokenize, msg).token_ids)

    def list_models(self) -> list[ModelInfo]:
        return [wire.model_from_proto(m) for m in self._unary(self._stub.ListModels, pb.ListModelsRequest()).models]

    def status(self) -> dict:
        """Workers' and router's status: ``{"mode", "router": {...}, "workers": [{"id", "role", ...}]}``."""
        return wire.status_from_proto(self._unary(self._stub.Status, pb.StatusRequest()))

    def health(self, service: str = "") -> str:
        """The health status name ("SERVING", "NOT_SERVING", ...)."""
        resp = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stream(self, prompt: str | None, stream: bool, timeout: float | None, kwargs: dict) -> Iterator[Delta]:
        msg = wire.request_to_proto(make_request(prompt, **kwargs), stream=stream)
        call = self._stub.Generate(msg, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            for r in call:
                yield wire.delta_from_proto(r)
        except grpc.RpcError as e:
            raise DsaServeError.from_rpc_error(e) from None
        finally:
            call.cancel()  # a no-op when done; aborts the request when the caller stopped early

    def _unary(self, method: Any, msg: Any) -> Any:
        try:
            return method(msg, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise DsaServeError.from_rpc_error(e) from None


class AsyncClient:
    """The asyncio twin of ``Client`` (same methods, awaited; streams are async iterators)."""

    def __init__(self, address: str, *, timeout: float | None = None, api_key: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 tls_server_name: str | None = None) -> None:
        self.address = address
        self.timeout = timeout
        key = api_key if api_key is not None else os.environ.get("DSASERVE_API_KEY")
        self._metadata = (("authorization", f"Bearer {key}"),) if key else None
        tls = ClientTLS.from_options(tls_ca, tls_cert, tls_key, tls_server_name)
        self._channel = _open_channel(grpc.aio, address, tls)
        self._stub = pb_grpc.DsaServeStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any) -> Completion:
        return Completion.from_deltas([d async for d in self._stream(prompt, False, timeout, kwargs)])

    def generate_stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> AsyncIterator[Delta]:
        return self._stream(prompt, True, timeout, kwargs)

    async def generate_batch(
        self,
        requests: Iterable[CompletionRequest | Mapping[str, Any]]
        | AsyncIterable[CompletionRequest | Mapping[str, Any]],
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[BatchResult]:
        feed = _BatchFeed()
        messages = feed.amessages(requests) if isinstance(requests, AsyncIterable) else feed.messages(requests)
        call = self._stub.GenerateBatch(messages, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            async for r in call:
                for rejected in feed.drain():
                    yield rejected
                yield _batch_result(r)
            for rejected in feed.drain():
                yield rejected
        except grpc.RpcError as e:
            raise DsaServeError.from_rpc_error(e) from None
        finally:
            call.cancel()

    async def tokenize(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        msg = pb.TokenizeRequest(text=text, add_bos=add_bos) if add_bos is not None else pb.TokenizeRequest(text=text)
        return list((await self._unary(self._stub.Tokenize, msg)).token_ids)

    async def list_models(self) -> list[ModelInfo]:
        return [
            wire.model_from_proto(m) for m in (await self._unary(self._stub.ListModels, pb.ListModelsRequest())).models
        ]

    async def status(self) -> dict:
        return wire.status_from_proto(await self._unary(self._stub.Status, pb.StatusRequest()))

    async def health(self, service: str = "") -> str:
        resp = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _stream(
        self, prompt: str | None, stream: bool, timeout: float | None, kwargs: dict
    ) -> AsyncIterator[Delta]:
        msg = wire.request_to_proto(make_request(prompt, **kwargs), stream=stream)
        call = self._stub.Generate(msg, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            async for r in call:
                yield wire.delta_from_proto(r)
        except grpc.RpcError as e:
            raise DsaServeError.from_rpc_error(e) from None
        finally:
            call.cancel()

    async def _unary(self, method: Any, msg: Any) -> Any:
        try:
            return await method(msg, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise DsaServeError.from_rpc_error(e) from None
