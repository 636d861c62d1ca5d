"""The router-side dispatcher that local mode and cluster mode share.

``Dispatcher`` is the ``Backend`` both modes serve from: admission (a bounded number of requests in
flight, RESOURCE_EXHAUSTED with retry pushback beyond it), readiness (health, and calls that arrive
while the workers start wait up to a bounded time instead of failing), the routing decision and
its conditional-disaggregation branch, peer pulls (the chosen worker reads a prefix another worker
holds: the holder exports it first), retries when a worker dies mid-request (the stream goes on
where it stopped), and the router's counters. What differs between modes is only how workers are
reached: a ``WorkerSet`` (engines on a thread in local mode, Ray Serve handles in cluster mode).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol

from router.backend import AdmissionError, BackendUnavailable, ModelInfo
from router.disagg import DecodeWorker, PrefillWorker, PrefixHolder, continue_request, generate_disaggregated
from router.metrics import RouterMetrics
from router.routing import CacheAwareRouting, Route
from workers.engine.peer import export_id
from workers.engine.types import GenerateRequest, KVHandle, RequestOutput, WorkerStats

log = logging.getLogger(__name__)
READY_POLL_S = 0.25
EXPORT_TIMEOUT_S = 5.0  # a holder slower than this to lease a prefix is skipped: the prefix is computed


class WorkerSet(Protocol):
    """How a ``Dispatcher`` reaches workers.

    Contract:
    - ``current()`` returns the latest stats of every worker (possibly cached for a fraction of a
      second; ``refresh()`` drops the cache); ``snapshot()`` is its blocking twin for status calls.
    - ``prefill(worker_id)``/``decode(worker_id)`` return the ``router.disagg`` faces of a worker;
      ``decode(None)`` is any decode-capable worker; ``holder(worker_id)`` is the face of any worker
      (prefill or decode) that peers pull a prefix from.
    - ``retryable`` are the exceptions meaning "the worker died": the request is retried elsewhere.
    - ``expects_prefill``: the deployment has prefill workers, so readiness at start-up waits for one.
    - ``health_error()`` names a failure that stops every worker of the set (a crashed engine loop), or None.
    """

    mode: str
    retryable: tuple[type[BaseException], ...]
    expects_prefill: bool

    async def current(self) -> list[WorkerStats]: ...

    def snapshot(self) -> list[WorkerStats]: ...

    def refresh(self) -> None: ...

    def health_error(self) -> str | None: ...

    def prefill(self, worker_id: str) -> PrefillWorker: ...

    def decode(self, worker_id: str | None) -> DecodeWorker: ...

    def holder(self, worker_id: str) -> PrefixHolder: ...


@dataclass(frozen=True)
class DispatchConfig:
    """``startup_timeout_s``: how long a call waits for the first ready moment of the workers;
    ``max_attempts``/``retry_backoff_s``: retries when a worker dies mid-request;
    ``retry_after_s``: the pushback a client gets when the queue is full."""

    startup_timeout_s: float = 60.0
    max_attempts: int = 3
    retry_backoff_s: float = 0.5
    retry_after_s: float = 1.0


def readiness(workers: Sequence[WorkerStats], *, expects_prefill: bool) -> str | None:
    """Why a Generate would not succeed now (None: it would): a healthy decode-capable worker is
    needed, and a healthy prefill worker too when the deployment has prefill workers."""
    live = [w for w in workers if w.healthy]
    if not any(w.role in ("decode", "both") for w in live):
        return "no decode worker is ready"
    if expects_prefill and not any(w.role == "prefill" for w in live):
        return "no prefill worker is ready"
    return None


class Dispatcher:
    """``router.backend.Backend`` over a ``WorkerSet``, routed by ``CacheAwareRouting``."""

    def __init__(self, workers: WorkerSet, info: ModelInfo, routing: CacheAwareRouting,
                 config: DispatchConfig | None = None) -> None:
        self.workers, self._info, self.routing = workers, info, routing
        self.config = config or DispatchConfig()
        self.in_flight = 0
        self.in_flight_by_priority: Counter[int] = Counter()  # batch jobs yield to what runs ahead of them
        self.requests_total = 0
        self.errors_total = 0
        self.rejected_total = 0  # RESOURCE_EXHAUSTED answers
        self.routes: dict[str, int] = {}  # decisions by reason
        self.pulls = {"planned": 0, "exported_blocks": 0, "failed": 0}  # peer pulls the router arranged
        self.metrics = RouterMetrics(info.model_id, self.stats)  # ``router.metrics.render`` reads it
        self._ready_once = False

    def info(self) -> ModelInfo:
        return self._info

    async def health(self) -> str | None:
        """Why this backend cannot serve a Generate now (None: it can). Once ready, losing every
        prefill worker still serves (decode workers prefill); losing every decode worker does not."""
        error = self.workers.health_error() or readiness(await self.workers.current(),
                                                         expects_prefill=self._expects_prefill())
        self._ready_once = self._ready_once or error is None
        return error

    def stats(self) -> dict:
        router = {"requests_total": self.requests_total, "in_flight": self.in_flight, "errors_total": self.errors_total,
                  "rejected_total": self.rejected_total, "routes": dict(self.routes),
                  "index_errors": self.routing.index_errors, "peer_pulls": dict(self.pulls)}
        return {"mode": self.workers.mode, "router": router, "workers": self.workers.snapshot()}

    async def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        if self.in_flight >= self._info.max_queue:
            self.rejected_total += 1
            raise AdmissionError(f"admission queue full ({self._info.max_queue} requests in flight)",
                                 retry_after_s=self.config.retry_after_s)
        self.in_flight += 1
        self.in_flight_by_priority[req.priority] += 1
        self.requests_total += 1
        try:
            await self._until_ready()
            sent: list[int] = []
            ttft: float | None = None
            queued = False  # the queue time is observed
            for attempt in range(self.config.max_attempts):
                if not sent:
                    stream = self._route(req)
                else:  # a worker died mid-stream: go on from what the client already has
                    stream = continue_request(req, tuple(sent), self.workers.decode(None), ttft=ttft)
                try:
                    async with aclosing(stream) as outs:
                        async for out in outs:
                            sent.extend(out.new_token_ids)
                            ttft = out.ttft_s if ttft is None else ttft
                            if out.queue_s is not None and not queued:
                                queued = True
                                self.metrics.queue.observe(out.queue_s)
                            if out.finish_reason == "error":
                                self.errors_total += 1
                            yield out
                    return
                except self.workers.retryable as e:
                    log.warning("request %s: worker failed (%s); attempt %d of %d", req.request_id,
                                type(e).__name__, attempt + 1, self.config.max_attempts)
                    self.workers.refresh()  # the dead worker drops out of the next decision
                    await asyncio.sleep(self.config.retry_backoff_s * (attempt + 1))
            self.errors_total += 1
            raise BackendUnavailable(f"workers failed {self.config.max_attempts} times for this request")
        finally:
            self.in_flight -= 1
            self.in_flight_by_priority[req.priority] -= 1

    def _expects_prefill(self) -> bool:
        return self.workers.expects_prefill and not self._ready_once

    async def _until_ready(self) -> None:
        """Return once a Generate can succeed; while the workers have never been ready (start-up),
        wait up to ``startup_timeout_s``; afterwards fail at once (UNAVAILABLE)."""
        error = await self.health()
        if error is None:
            return
        deadline = time.monotonic() + (0.0 if self._ready_once else self.config.startup_timeout_s)
        while error is not None and time.monotonic() < deadline:
            await asyncio.sleep(READY_POLL_S)
            self.workers.refresh()
            error = await self.health()
        if error is not None:
            raise BackendUnavailable(error)

    async def _route(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        route = await self.routing.plan(req, await self.workers.current())
        decision = route.decision
        self.routes[decision.reason] = self.routes.get(decision.reason, 0) + 1
        decode = self.workers.decode(decision.decode_worker)
        uncached = len(req.prompt_token_ids) - decision.expected_cached_tokens
        self.routing.start(route, uncached)
        prefilling, prefix = True, None
        try:
            prefix = await self._export(req, route)  # no pull: returns at once, without yielding
            self.routing.remember(req.request_id, route)
            if decision.prefill_worker is None:  # conditional disaggregation: prefill on the decode worker
                stream = decode.generate(req, prefix)
            else:
                stream = generate_disaggregated(req, self.workers.prefill(decision.prefill_worker), decode,
                                                eos_token_id=self._info.eos_token_id,
                                                max_model_len=self._info.max_context, prefix=prefix)
            async with aclosing(stream) as outs:
                async for out in outs:
                    if prefilling:  # the first output means the prefill (and any pull) is done
                        prefilling = False
                        self._prefilled(req, route, uncached, prefix)
                    yield out
        finally:
            if prefilling:
                self._prefilled(req, route, uncached, prefix)

    async def _export(self, req: GenerateRequest, route: Route) -> KVHandle | None:
        """Ask the holder of a planned pull to lease the prefix (None: no pull, or it failed)."""
        pull = route.decision.pull
        if pull is None:
            return None
        self.pulls["planned"] += 1
        try:
            async with asyncio.timeout(EXPORT_TIMEOUT_S):
                handle = await self.workers.holder(pull.source).export(req.request_id, list(route.pulled_hashes()),
                                                                       pull.first_block)
        except Exception as e:  # noqa: BLE001 — a dead or slow holder costs the pull, never the request
            log.info("request %s: peer %s could not export its prefix (%s: %s); computing it",
                     req.request_id, pull.source, type(e).__name__, e)
            self.pulls["failed"] += 1
            return None
        if handle is None:
            self.pulls["failed"] += 1
        else:
            self.pulls["exported_blocks"] += len(handle.block_ids)
        return handle

    def _prefilled(self, req: GenerateRequest, route: Route, uncached: int, prefix: KVHandle | None) -> None:
        self.routing.prefilled(req.request_id, route, uncached)
        if prefix is not None:  # read (or failed) by now: the holder may drop its lease at once
            try:
                self.workers.holder(prefix.worker_id).release(export_id(req.request_id))
            except Exception as e:  # noqa: BLE001 — the lease expires anyway
                log.debug("releasing %s's exported prefix: %s", req.request_id, e)
