"""CacheAwareRouting: from a request to a ``RouteDecision``, using the KV index and worker stats.

Per request: the prompt's chained block hashes (the same function the workers use), one
longest-prefix lookup in the index, candidates built from the latest worker stats plus the work
this router assigned since those stats were taken, then the policy. When the index fails in any way
(``IndexUnavailable``, or an unexpected error) the request is routed by load alone and keeps flowing;
``index_errors`` counts those requests.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

from kvstore.hashing import block_hashes
from kvstore.index import IndexUnavailable, KVIndex
from router.backend import BackendUnavailable
from router.policy import DecodeCandidate, NoCandidates, PrefillCandidate, RouteDecision, RouteRequest, RoutingPolicy
from workers.engine.types import GenerateRequest, WorkerStats

log = logging.getLogger(__name__)


class CacheAwareRouting:
    """Decides where a request runs, from the latest ``WorkerStats`` of every worker."""

    def __init__(self, policy: RoutingPolicy, index: KVIndex | None, *, model_id: str, block_size: int) -> None:
        self.policy, self.index = policy, index
        self.model_id, self.block_size = model_id, block_size
        self.index_errors = 0
        # Uncached prompt tokens sent to a prefill worker and not yet prefilled: stats lag behind.
        self._assigned: defaultdict[str, int] = defaultdict(int)

    async def decide(self, req: GenerateRequest, workers: Sequence[WorkerStats]) -> RouteDecision:
        matches = {}
        if self.index is not None:
            hashes = block_hashes(req.prompt_token_ids, model_id=self.model_id, cache_salt=req.cache_salt,
                                  block_size=self.block_size)
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
        prefill = [
            PrefillCandidate(
                worker_id=w.worker_id, matched_blocks=_matched(matches, w.worker_id),
                queued_tokens=w.queued_tokens + self._assigned[w.worker_id],
                running=w.running + w.waiting, free_blocks=w.free_blocks,
            )
            for w in live if w.role == "prefill"
        ]
        decode = [
            DecodeCandidate(
                worker_id=w.worker_id, free_blocks=w.free_blocks, total_blocks=w.total_blocks,
                running=w.running + w.waiting, matched_blocks=_matched(matches, w.worker_id),
                queued_prefill_tokens=w.queued_tokens,
            )
            for w in live if w.role in ("decode", "both")
        ]
        try:
            return self.policy.route(RouteRequest(len(req.prompt_token_ids), self.block_size, req.params.max_tokens),
                                     prefill, decode)
        except NoCandidates as e:  # every worker of a kind is down: the client should retry later
            raise BackendUnavailable(str(e)) from e

    def assign(self, worker_id: str | None, tokens: int) -> None:
        if worker_id is not None:
            self._assigned[worker_id] += tokens

    def done(self, worker_id: str | None, tokens: int) -> None:
        if worker_id is not None:
            self._assigned[worker_id] = max(0, self._assigned[worker_id] - tokens)


def _matched(matches: dict, worker_id: str) -> int:
    m = matches.get(worker_id)
    return m.matched_blocks if m is not None else 0
