"""CacheAwareRouting: from a request to a ``RouteDecision``, using the KV index and worker stats.

Per request: the prompt's chained block hashes (the same function the workers use), one
longest-prefix lookup in the index, extended by the blocks this router itself just routed
(``router.pending.PendingRoutes``: the index learns of them only after the worker computed and
published them), candidates built from the latest worker stats plus the work this router assigned
since those stats were taken, pull sources (every live worker the index shows holding part of the
prompt: a pending block may not be computed yet), the
measured KV link speed, then the policy. Blocks in a shared disk cache folder count for every
worker that mounts it (its ``disk_volume``). When the index fails in any way (``IndexUnavailable``, or an
unexpected error) the request is routed by load (and pending blocks) alone and keeps flowing;
``index_errors`` counts those requests.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.hashing import BlockHash, block_hashes
from kvstore.index import IndexUnavailable, KVIndex, volume_worker_id
from router.backend import BackendUnavailable
from router.pending import PendingRoutes
from router.policy import (
    DecodeCandidate, NoCandidates, PrefillCandidate, PullSource, RouteDecision, RouteRequest, RoutingPolicy,
)
from workers.engine.types import GenerateRequest, WorkerStats

log = logging.getLogger(__name__)
MIN_MEASURED_BYTES = 1 << 20  # KV bytes read before the link speed is taken from measurements


@dataclass(frozen=True)
class Route:
    """A decision and the prompt's block hashes it was made with (a pull exports some of them)."""

    decision: RouteDecision
    hashes: tuple[BlockHash, ...]

    def pulled_hashes(self) -> tuple[BlockHash, ...]:
        pull = self.decision.pull
        return () if pull is None else self.hashes[pull.first_block : pull.first_block + pull.num_blocks]


class CacheAwareRouting:
    """Decides where a request runs, from the latest ``WorkerStats`` of every worker."""

    def __init__(self, policy: RoutingPolicy, index: KVIndex | None, *, model_id: str, block_size: int,
                 pending: PendingRoutes | None = None, link_bytes_per_s: float | None = None) -> None:
        """``pending``: where routed blocks are remembered (None: a ``PendingRoutes`` with its defaults);
        ``link_bytes_per_s``: a fixed KV link speed for pull planning (None: measured)."""
        self.policy, self.index = policy, index
        self.link_bytes_per_s = link_bytes_per_s
        self.model_id, self.block_size = model_id, block_size
        self.pending = pending if pending is not None else PendingRoutes()
        self.index_errors = 0
        # Uncached prompt tokens sent to a prefill worker and not yet prefilled: stats lag behind.
        self._assigned: defaultdict[str, int] = defaultdict(int)

    async def decide(self, req: GenerateRequest, workers: Sequence[WorkerStats]) -> RouteDecision:
        return (await self.plan(req, workers)).decision

    async def plan(self, req: GenerateRequest, workers: Sequence[WorkerStats]) -> Route:
        """The decision for ``req`` and the hashes behind it; nothing is recorded (``start`` does)."""
        hashes = block_hashes(req.prompt_token_ids, model_id=self.model_id, cache_salt=req.cache_salt,
                              block_size=self.block_size)
        matches = {}
        if self.index is not None:
            try:
                matches = await self.index.longest_prefix(hashes) if hashes else {}
            except IndexUnavailable as e:  # route by load until the index answers again
                self.index_errors += 1
                log.debug("KV index unavailable (%s): routing by load", e)
            except Exception as e:  # a broken index must cost cache hits, never the request
                self.index_errors += 1
                log.warning("KV index lookup failed unexpectedly (%r): routing by load", e,
                            exc_info=self.index_errors == 1)
        live = [w for w in workers if w.healthy]
        indexed = {w: m.matched_blocks for w, m in matches.items()}
        for w in live:  # a shared disk cache folder serves every worker that mounts it
            if w.disk_volume is not None:
                indexed[w.worker_id] = max(indexed.get(w.worker_id, 0), indexed.get(volume_worker_id(w.disk_volume), 0))
        matched = self.pending.extend(hashes, indexed, [w.worker_id for w in live])
        prefill = [
            PrefillCandidate(
                worker_id=w.worker_id, matched_blocks=matched[w.worker_id],
                queued_tokens=w.queued_tokens + self._assigned[w.worker_id],
                running=w.running + w.waiting, free_blocks=w.free_blocks,
            )
            for w in live if w.role == "prefill"
        ]
        decode = [
            DecodeCandidate(
                worker_id=w.worker_id, free_blocks=w.free_blocks, total_blocks=w.total_blocks,
                running=w.running + w.waiting, matched_blocks=matched[w.worker_id],
                queued_prefill_tokens=w.queued_tokens,
            )
            for w in live if w.role in ("decode", "both")
        ]
        # Pull sources only where the index shows the blocks: pending ones may not be computed yet.
        sources = [PullSource(w.worker_id, indexed[w.worker_id], w.queued_tokens + self._assigned[w.worker_id],
                              w.step_tokens) for w in live if indexed.get(w.worker_id, 0) > 0]
        request = RouteRequest(len(req.prompt_token_ids), self.block_size, req.params.max_tokens,
                               block_bytes=int(max((w.kv_bytes_per_token for w in live), default=0) * self.block_size),
                               link_bytes_per_s=self.link_bytes_per_s or measured_link_speed(live))
        try:
            decision = self.policy.route(request, prefill, decode, sources=sources)
        except NoCandidates as e:  # every worker of a kind is down: the client should retry later
            raise BackendUnavailable(str(e)) from e
        return Route(decision, tuple(hashes))

    def start(self, route: Route, uncached_tokens: int) -> None:
        """``route`` is being carried out: count its prefill work (``remember`` records its blocks)."""
        self.assign(route.decision.prefill_worker, uncached_tokens)

    def remember(self, request_id: str, route: Route) -> None:
        """Count the prompt's blocks as pending on the prefill worker and the decode worker it hands to.
        Call it once a pull's prefix export is in hand: a request routed to the puller for the prefix
        before that could reach it ahead of the pull and compute the prefix itself."""
        d = route.decision
        for worker_id in {d.prefill_worker or d.decode_worker, d.decode_worker}:
            self.pending.record(request_id, worker_id, route.hashes)

    def prefilled(self, request_id: str, route: Route, uncached_tokens: int) -> None:
        """The prefill of a started route is over (done, failed or abandoned)."""
        self.done(route.decision.prefill_worker, uncached_tokens)
        self.pending.finish(request_id)

    def assign(self, worker_id: str | None, tokens: int) -> None:
        if worker_id is not None:
            self._assigned[worker_id] += tokens

    def done(self, worker_id: str | None, tokens: int) -> None:
        if worker_id is not None:
            self._assigned[worker_id] = max(0, self._assigned[worker_id] - tokens)


def measured_link_speed(workers: Sequence[WorkerStats]) -> float:
    """Bytes per second of the KV reads the workers timed (0.0 until enough bytes were read)."""
    timed = [w.kv_transfer for w in workers if w.kv_transfer.seconds]
    nbytes, seconds = sum(t.bytes for t in timed), sum(t.seconds or 0.0 for t in timed)
    return nbytes / seconds if nbytes >= MIN_MEASURED_BYTES and seconds > 0 else 0.0
