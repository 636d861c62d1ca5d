"""A TLS front: a gRPC server that terminates TLS (optionally mutual TLS) and forwards every call,
unchanged, to a plaintext upstream server.

Ray Serve's gRPC proxy speaks plaintext only; in cluster mode this runs in front of it (``dsaserve
serve`` with ``router.tls``, or the Helm chart's ``tls-front`` sidecar, ``dsaserve tls-front``).

Forwarding is generic, so it needs no knowledge of the services behind it (``dsaserve.v1``, health,
reflection): every method is relayed as raw bytes through a bidirectional stream, which carries unary
and streaming calls alike (the wire format is the same). The client's metadata and remaining deadline
go upstream; the upstream's initial metadata, messages, status code, details and trailing metadata come
back. A client that cancels cancels the upstream call; an unreachable upstream is UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence

import grpc

from router.tls import TLSConfig, server_credentials

# The front relays messages; their size limits are the upstream's and the client's business.
_UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
# Set by each hop itself; forwarding them would duplicate or contradict the new hop's values.
_HOP_KEYS = {"user-agent", "te", "content-type", "host"}


def _forwardable(metadata: Sequence[tuple[str, str | bytes]] | None) -> tuple[tuple[str, str | bytes], ...]:
    """Application metadata: without HTTP/2 pseudo-headers and per-hop headers."""
    return tuple(
        (k, v) for k, v in (metadata or ()) if not k.startswith(":") and k not in _HOP_KEYS
    )


class _Forwarder(grpc.GenericRpcHandler):
    """Answers every method by relaying it to ``channel``."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        upstream = self.channel.stream_stream(handler_call_details.method)  # no (de)serializers: bytes

        async def forward(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
            await _relay(upstream, requests, context)

        return grpc.stream_stream_rpc_method_handler(forward)


async def _relay(
    upstream: grpc.aio.StreamStreamMultiCallable, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> None:
    call = upstream(
        requests, metadata=_forwardable(context.invocation_metadata()), timeout=context.time_remaining()
    )
    try:
        initial = _forwardable(await call.initial_metadata())
        if initial:
            await context.send_initial_metadata(initial)
        async for message in call:
            await context.write(message)
        trailing = await call.trailing_metadata()
    except grpc.aio.AioRpcError as e:
        status: grpc.aio.AioRpcError | None = e
    else:
        status = None
    finally:
        call.cancel()  # a no-op when the call ended; stops the upstream when the client went away
    if status is None:
        context.set_trailing_metadata(_forwardable(trailing))
        return
    await context.abort(status.code(), status.details() or "", _forwardable(status.trailing_metadata()))


class TLSFront:
    """A running front: ``port`` is the port it listens on (``listen`` may ask for port 0)."""

    def __init__(self, server: grpc.aio.Server, channel: grpc.aio.Channel, port: int, upstream: str) -> None:
        self.server, self.channel, self.port, self.upstream = server, channel, port, upstream

    @classmethod
    async def start(cls, listen: str, upstream: str, tls: TLSConfig) -> TLSFront:
        """Listen on ``listen`` (HOST:PORT) with ``tls`` and forward to ``upstream`` (HOST:PORT,
        plaintext). The upstream need not be up yet: calls fail with UNAVAILABLE until it is.

        Raises:
            TLSError: a TLS file is missing or unusable (names it).
            OSError: ``listen`` cannot be bound.
        """
        credentials = server_credentials(tls)
        channel = grpc.aio.insecure_channel(upstream, options=_UNLIMITED)
        server = grpc.aio.server(options=_UNLIMITED)
        server.add_generic_rpc_handlers((_Forwarder(channel),))
        try:
            port = server.add_secure_port(listen, credentials)
        except RuntimeError:
            port = 0
        if port == 0:
            await channel.close()
            raise OSError(f"cannot listen on {listen}")
        await server.start()
        return cls(server, channel, port, upstream)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls; calls in flight get ``grace`` seconds, then are cancelled."""
        await self.server.stop(grace)
        await self.channel.close()


class TLSFrontThread:
    """A ``TLSFront`` on its own event loop in a daemon thread, for synchronous callers."""

    def __init__(self, listen: str, upstream: str, tls: TLSConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dsaserve-tls-front", daemon=True)
        self.thread.start()
        try:
            self.front = self._run(TLSFront.start(listen, upstream, tls))
        except BaseException:
            self._end_loop()
            raise

    @property
    def port(self) -> int:
        return self.front.port

    def stop(self, grace: float | None = 5.0) -> None:
        try:
            self._run(self.front.stop(grace), timeout=(grace or 0) + 10.0)
        finally:
            self._end_loop()

    def _run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _end_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
