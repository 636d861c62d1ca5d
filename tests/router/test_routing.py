"""CacheAwareRouting: the candidates it offers the policy come from the workers' typed stats, the
index's prefix matches, and the work it assigned since those stats were taken."""

from __future__ import annotations

import asyncio

import pytest

from kvstore.hashing import block_hashes
from kvstore.index import InMemoryKVIndex
from router.backend import BackendUnavailable
from router.policy import DecodeCandidate, DSAServePolicy, PrefillCandidate, RouteDecision
from router.routing import CacheAwareRouting
from workers.engine.types import GenerateRequest, WorkerStats

BLOCK = 4
PROMPT = tuple(range(10, 30))  # 5 blocks


class Recording:
    """A policy that keeps what it was offered and picks the first of each kind."""

    name = "recording"

    def route(self, request, prefill, decode) -> RouteDecision:
        self.offered = (list(prefill), list(decode))
        return RouteDecision(prefill[0].worker_id if prefill else None, decode[0].worker_id, 0, "recorded")


def worker(worker_id: str, role: str, **kw) -> WorkerStats:
    return WorkerStats(worker_id=worker_id, role=role, **{"waiting": 0, "running": 0, "free_blocks": 100,
                                                          "total_blocks": 100, **kw})


def test_candidates_carry_each_live_workers_load_and_matches():
    index = InMemoryKVIndex("m", BLOCK)

    async def held_by_p0():
        await index.register_worker("p0", "prefill")
        await index.store("p0", "device", block_hashes(PROMPT, model_id="m", block_size=BLOCK)[:3])

    asyncio.run(held_by_p0())
    policy = Recording()
    routing = CacheAwareRouting(policy, index, model_id="m", block_size=BLOCK)
    routing.assign("p0", 12)  # sent to p0 since its stats were taken
    workers = [
        worker("p0", "prefill", waiting=1, running=2, free_blocks=10, queued_tokens=30),
        worker("p1", "prefill", healthy=False),
        worker("d0", "decode", running=5, waiting=1, free_blocks=50, total_blocks=80, queued_tokens=7),
        worker("d1", "decode", healthy=False),
    ]
    asyncio.run(routing.decide(GenerateRequest("r", PROMPT), workers))
    prefill, decode = policy.offered
    assert prefill == [PrefillCandidate("p0", matched_blocks=3, queued_tokens=42, running=3, free_blocks=10)]
    assert decode == [DecodeCandidate("d0", free_blocks=50, total_blocks=80, running=6, queued_prefill_tokens=7)]


def test_no_live_decode_worker_means_unavailable():
    routing = CacheAwareRouting(DSAServePolicy(), None, model_id="m", block_size=BLOCK)
    workers = [worker("p0", "prefill"), worker("d0", "decode", healthy=False)]
    with pytest.raises(BackendUnavailable, match="no decode worker"):
        asyncio.run(routing.decide(GenerateRequest("r", PROMPT), workers))
