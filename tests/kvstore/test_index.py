"""KVIndex behaviour, the same tests against the in-memory index and a real Redis server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from kvstore.hashing import HASH_VERSION, block_hashes
from kvstore.index import (
    HashAgreementError,
    IndexEvent,
    IndexUnavailable,
    PrefixMatch,
    WorkerNotRegistered,
    agreement_digest,
    namespace,
)

from .conftest import IndexFactory

HASHES = block_hashes(list(range(64 * 6)), model_id="test")  # six chained blocks


def run(factory: IndexFactory, body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        try:
            await body()
        finally:
            await factory.close()

    asyncio.run(main())


def test_longest_prefix_across_workers_and_tiers(factory: IndexFactory):
    async def body():
        index = factory.new()
        for w, role in (("a", "prefill"), ("b", "prefill"), ("c", "prefill"), ("d", "decode")):
            await index.register_worker(w, role, ttl_s=30)
        await index.store("a", "device", HASHES[:3])
        await index.store("a", "host", HASHES[2:4])  # block 2 on two tiers: counted on device
        await index.store("a", "disk", HASHES[4:5])
        await index.store("b", "disk", HASHES[:2])
        await index.store("d", "device", HASHES[1:6])  # no first block: no prefix
        assert await index.longest_prefix(HASHES) == {
            "a": PrefixMatch("a", 5, device_blocks=3, host_blocks=1, disk_blocks=1),
            "b": PrefixMatch("b", 2, disk_blocks=2),
            "c": PrefixMatch("c", 0),
            "d": PrefixMatch("d", 0),
        }
        assert (await index.longest_prefix(HASHES[:1]))["a"].matched_blocks == 1
        assert {w.worker_id: w.role for w in await index.workers()} == {
            "a": "prefill", "b": "prefill", "c": "prefill", "d": "decode"}

    run(factory, body)


def test_remove_keeps_other_tiers_and_clear_forgets_worker(factory: IndexFactory):
    async def body():
        index = factory.new()
        await index.register_worker("a", "prefill", ttl_s=30)
        await index.store("a", "device", HASHES[:4])
        await index.store("a", "host", HASHES[:2])
        await index.remove("a", "device", HASHES[:4])
        assert (await index.longest_prefix(HASHES))["a"] == PrefixMatch("a", 2, host_blocks=2)
        await index.remove("a", "host", HASHES[1:2])  # a hole ends the prefix
        assert (await index.longest_prefix(HASHES))["a"].matched_blocks == 1
        await index.clear_worker("a")
        assert await index.longest_prefix(HASHES) == {}
        assert await index.workers() == []
        with pytest.raises(WorkerNotRegistered):
            await index.store("a", "device", HASHES[:1])

    run(factory, body)


def test_dead_worker_stops_counting_within_seconds(factory: IndexFactory):
    async def body():
        index = factory.new()
        await index.register_worker("alive", "prefill", ttl_s=1)
        await index.register_worker("dead", "prefill", ttl_s=1)
        await index.store("alive", "device", HASHES[:2])
        await index.store("dead", "device", HASHES[:3])
        for _ in range(3):
            await asyncio.sleep(0.45)
            assert await index.heartbeat("alive")
        assert set(await index.longest_prefix(HASHES)) == {"alive"}
        assert [w.worker_id for w in await index.workers()] == ["alive"]
        assert not await index.heartbeat("dead")
        with pytest.raises(WorkerNotRegistered):
            await index.store("dead", "device", HASHES[:1])
        await index.register_worker("dead", "prefill", ttl_s=1)  # back: must re-publish its blocks
        assert (await index.longest_prefix(HASHES))["dead"].matched_blocks == 0

    run(factory, body)


def test_changes_are_published_as_events(factory: IndexFactory):
    async def body():
        index = factory.new()
        await index.register_worker("a", "prefill", ttl_s=30)
        await index.store("a", "device", HASHES[:2])
        await index.store("a", "device", HASHES[:2])  # nothing new: no event
        await index.remove("a", "device", HASHES[1:2])
        await index.store("a", "disk", HASHES[1:2])
        assert await index.recent_events() == [
            IndexEvent("stored", "a", "device", tuple(HASHES[:2])),
            IndexEvent("removed", "a", "device", tuple(HASHES[1:2])),
            IndexEvent("stored", "a", "disk", tuple(HASHES[1:2])),
        ]
        assert await index.recent_events(1) == [IndexEvent("stored", "a", "disk", tuple(HASHES[1:2]))]

    run(factory, body)


def test_hash_agreement_passes_then_fails_with_both_digests(factory: IndexFactory):
    def other_hashing(tokens, **kwargs):  # a process whose hashing drifted (another seed, say)
        return block_hashes([t + 1 for t in tokens], **kwargs)

    async def body():
        index = factory.new()
        await index.check_hash_agreement()
        await factory.peer(index).check_hash_agreement()  # same hashing in "another process"
        drifted = factory.peer(index, hasher=other_hashing)
        with pytest.raises(HashAgreementError) as err:
            await drifted.check_hash_agreement()
        message = str(err.value)
        assert agreement_digest(factory.model_id, 64) in message
        assert agreement_digest(factory.model_id, 64, other_hashing) in message
        assert f"v{HASH_VERSION}" in message and factory.model_id in message

    run(factory, body)


def test_redis_keys_are_namespaced_and_events_trimmed(redis_server):
    import redis.asyncio as aioredis

    factory = IndexFactory("redis", redis_server.url)

    async def body():
        index = factory.new(events_maxlen=10)
        await index.register_worker("a", "prefill", ttl_s=30)
        for h in HASHES * 100:
            await index.store("a", "device", [h])
            await index.remove("a", "device", [h])
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            keys = [k.decode() async for k in raw.scan_iter(match=f"*{factory.model_id}*")]
            ns = namespace(factory.model_id, 64)
            assert ns.endswith(f":bs64:sha256v{HASH_VERSION}}}")
            assert keys and all(k.startswith(ns) for k in keys), keys
            assert 10 <= await raw.xlen(f"{ns}:events") < 300  # MAXLEN ~ 10 trims whole stream nodes
        finally:
            await raw.aclose()

    run(factory, body)


def test_redis_outage_raises_index_unavailable_and_recovers_empty(private_redis):
    factory = IndexFactory("redis", private_redis.url)

    async def body():
        index = factory.new(socket_timeout=1.0, socket_connect_timeout=0.5)
        await index.register_worker("a", "prefill", ttl_s=30)
        await index.store("a", "device", HASHES[:3])
        private_redis.stop()
        with pytest.raises(IndexUnavailable):
            await index.longest_prefix(HASHES)
        with pytest.raises(IndexUnavailable):
            await index.heartbeat("a")
        private_redis.start()  # back, and empty
        assert await index.longest_prefix(HASHES) == {}
        assert not await index.heartbeat("a")  # the worker learns it must re-register ...
        await index.register_worker("a", "prefill", ttl_s=30)
        await index.store("a", "device", HASHES[:3])  # ... and re-publish its blocks
        assert (await index.longest_prefix(HASHES))["a"].matched_blocks == 3

    run(factory, body)
