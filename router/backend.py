"""What the router serves from: the ``Backend`` protocol and its model facts.

Local mode implements it with engines in a background thread (``cluster.local.LocalBackend``); the
cluster mode with Ray Serve handles. The router never knows which.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from router.limits import RequestLimits
from workers.engine.types import GenerateRequest, RequestOutput


class AdmissionError(RuntimeError):
    """The admission queue is full; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendUnavailable(RuntimeError):
    """No healthy worker can take the request."""


@dataclass(frozen=True)
class ModelInfo:
    """Facts and limits the router validates against and reports in ListModels/Health."""

    model_id: str
    vocab_size: int
    max_context: int  # prompt + max_tokens must fit
    max_tokens_limit: int  # largest max_tokens a request may ask for
    max_queue: int  # admission queue depth
    block_size: int
    eos_token_id: int
    bos_token_id: int
    index_topk: int
    has_tokenizer: bool
    limits: RequestLimits = field(default_factory=RequestLimits)  # resolved: no derived (0) fields left


class Backend(Protocol):
    """Runs requests on workers.

    Contract:
    - ``info()`` is cheap and constant for the backend's lifetime.
    - ``generate(req)`` validates nothing beyond capacity: the router has validated the request. It
      raises ``AdmissionError`` before yielding when the queue is full and ``BackendUnavailable``
      when no worker is healthy. It yields ``RequestOutput`` increments; the last has ``finished``.
      Closing the iterator early (the client cancelled, a stop string matched, a deadline passed)
      aborts the request and frees its KV blocks.
    - ``stats()`` returns ``{"mode": str, "router": {counter: number}, "workers": [WorkerStats]}`` for
      health and debugging (the servicer turns it into the ``Status`` reply).
    - ``health()`` says why a Generate would not succeed now (None: it would); the gRPC health
      service answers NOT_SERVING while it is not None.
    """

    def info(self) -> ModelInfo: ...

    async def health(self) -> str | None: ...

    def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]: ...

    def stats(self) -> dict: ...


async def health_problem(backend: Backend) -> str | None:
    """``backend.health()`` for the health service and ``GET /health``: None when it can serve; a
    backend without ``health`` counts as healthy; a check that raises is itself the reason."""
    check = getattr(backend, "health", None)
    if check is None:
        return None
    try:
        return await check()
    except Exception as exc:  # noqa: BLE001 — a failing check is itself a reason not to serve
        return f"health check failed: {type(exc).__name__}: {exc}"
