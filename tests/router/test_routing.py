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

    def route(self, request, prefill, decode, sources=()) -> RouteDecision:
        self.request, self.offered, self.sources = request, (list(prefill), list(decode)), list(sources)
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


def test_a_routed_prefix_counts_on_its_worker_before_the_index_shows_it():
    """Back to back: the second request with the same prefix sees the first's blocks as held where the
    first was routed (the index has nothing yet)."""
    policy = Recording()
    routing = CacheAwareRouting(policy, InMemoryKVIndex("m", BLOCK), model_id="m", block_size=BLOCK)
    workers = [worker("p0", "prefill"), worker("p1", "prefill"), worker("d0", "decode")]
    first = asyncio.run(routing.plan(GenerateRequest("r1", PROMPT), workers))
    routing.start(first, len(PROMPT))
    routing.remember("r1", first)
    asyncio.run(routing.decide(GenerateRequest("r2", PROMPT[:-1] + (7,)), workers))
    prefill, decode = policy.offered
    assert [c.matched_blocks for c in prefill] == [4, 0]  # 4 full blocks of the 19 tokens they share
    assert decode[0].matched_blocks == 4  # the decode worker will hold the prompt too
    assert policy.sources == []  # only blocks the index shows can be pulled: these are not computed yet
    routing.prefilled("r1", first, len(PROMPT))  # in flight no more: pending for the TTL still
    asyncio.run(routing.decide(GenerateRequest("r3", PROMPT), workers))
    assert policy.offered[0][0].matched_blocks == 5


def test_a_shared_disk_volume_counts_for_every_worker_mounting_it():
    index = InMemoryKVIndex("m", BLOCK)

    async def on_volume():
        await index.register_worker("volume-v1", "volume")
        await index.store("volume-v1", "disk", block_hashes(PROMPT, model_id="m", block_size=BLOCK)[:2])

    asyncio.run(on_volume())
    policy = Recording()
    routing = CacheAwareRouting(policy, index, model_id="m", block_size=BLOCK)
    workers = [worker("p0", "prefill", disk_volume="v1"), worker("p1", "prefill"), worker("d0", "decode")]
    asyncio.run(routing.decide(GenerateRequest("r", PROMPT), workers))
    assert [c.matched_blocks for c in policy.offered[0]] == [2, 0]
    assert [(s.worker_id, s.matched_blocks) for s in policy.sources] == [("p0", 2)]


def test_the_link_speed_is_measured_from_the_workers_timed_reads():
    from workers.engine.types import TransferStats

    policy = Recording()
    routing = CacheAwareRouting(policy, None, model_id="m", block_size=BLOCK)
    timed = TransferStats("nixl", bytes=4 << 20, transfers=2, seconds=0.002)
    workers = [worker("p0", "prefill", kv_bytes_per_token=100.0), worker("d0", "decode", kv_transfer=timed)]
    asyncio.run(routing.decide(GenerateRequest("r", PROMPT), workers))
    assert policy.request.link_bytes_per_s == pytest.approx((4 << 20) / 0.002)
    assert policy.request.block_bytes == 100 * BLOCK
    fixed = CacheAwareRouting(policy, None, model_id="m", block_size=BLOCK, link_bytes_per_s=5e9)
    asyncio.run(fixed.decide(GenerateRequest("r", PROMPT), workers))
    assert policy.request.link_bytes_per_s == 5e9
