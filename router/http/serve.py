"""uvicorn serving the HTTP app on the caller's event loop (beside the gRPC server in ``dsaserve local``).

The listening socket is bound here, before uvicorn starts, so port 0 can pick a free port and the
caller learns which (``HTTPServer.port``). uvicorn's own signal handling is off: the process's
SIGINT/SIGTERM handlers (the CLI's) decide when to stop both servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn

from router.tls import TLSConfig


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the embedding process owns the signals


class HTTPServer:
    """A started uvicorn server: ``port`` is the bound port; ``stop`` ends it."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task, sock: socket.socket) -> None:
        self._server = server
        self._task = task
        self._sock = sock
        self.port: int = sock.getsockname()[1]

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, give open requests ``grace`` seconds, then close them."""
        self._server.config.timeout_graceful_shutdown = max(grace, 0.1)  # 0 would mean "log an error"
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace + 5.0)
        except TimeoutError:
            self._server.force_exit = True
            await self._task
        finally:
            self._sock.close()


async def start_http_server(app: Any, host: str = "127.0.0.1", port: int = 8000, *,
                            tls: TLSConfig | None = None, log_level: str = "warning") -> HTTPServer:
    """Serve ``app`` on ``host:port`` (0: a free port) until ``stop``; with ``tls`` HTTPS only
    (clients must present a certificate when it names a client CA).

    Raises:
        TLSError: a TLS file is missing or unusable (names it).
        OSError: the address cannot be bound.
    """
    if tls is not None:
        tls.check()
    sock = _bind(host, port)
    kwargs: dict[str, Any] = {}
    if tls is not None:
        kwargs = {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
        if tls.client_ca_file:
            kwargs |= {"ssl_ca_certs": tls.client_ca_file, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    config = uvicorn.Config(app, log_level=log_level, lifespan="off", access_log=False, **kwargs)
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            sock.close()
            task.result()  # raises what stopped it
            raise OSError(f"the HTTP server on {host}:{port} stopped while starting")
        await asyncio.sleep(0.01)
    return HTTPServer(server, task, sock)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
