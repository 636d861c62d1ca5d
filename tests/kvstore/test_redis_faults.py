"""Redis failing in ways other than going away — READONLY after a failover, MASTERDOWN, OOM, NOPERM —
on a real redis-server: the index says ``IndexUnavailable``, routing keeps deciding by load, and a
worker's publisher reports unhealthy, keeps a bounded queue, and re-publishes its blocks on recovery."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from kvstore.hashing import block_hashes
from kvstore.index import IndexUnavailable, PrefixMatch
from kvstore.publisher import IndexPublisher
from kvstore.redis_index import RedisKVIndex
from router.policy import RouteDecision
from router.routing import CacheAwareRouting
from workers.engine.types import GenerateRequest, WorkerStats

from ..redis_server import RedisServer, free_port

BLOCK = 4
USER, PASSWORD = "dsaserve", "secret"  # the ACL user every index connects as (the admin stays default)


class Fault:
    """One way for Redis to refuse work, applied and undone through an admin connection."""

    def __init__(self, name: str, apply: Callable[[redis.Redis], None], undo: Callable[[redis.Redis], None],
                 *, blocks_reads: bool) -> None:
        self.name, self._apply, self._undo, self.blocks_reads = name, apply, undo, blocks_reads

    def apply(self, admin: redis.Redis) -> None:
        self._apply(admin)

    def undo(self, admin: redis.Redis) -> None:
        self._undo(admin)


def _replica_of_nobody(admin: redis.Redis) -> None:
    admin.replicaof("127.0.0.1", free_port())  # a master that never answers: writes get READONLY


def _promote(admin: redis.Redis) -> None:
    admin.config_set("replica-serve-stale-data", "yes")
    admin.replicaof("NO", "ONE")


FAULTS = {
    "readonly": Fault("readonly", _replica_of_nobody, _promote, blocks_reads=False),
    "masterdown": Fault(
        "masterdown",
        lambda a: (_replica_of_nobody(a), a.config_set("replica-serve-stale-data", "no")),
        _promote, blocks_reads=True),
    "oom": Fault("oom", lambda a: a.config_set("maxmemory", "1"), lambda a: a.config_set("maxmemory", "0"),
                 blocks_reads=False),
    "noperm-write": Fault(
        "noperm-write", lambda a: a.acl_setuser(USER, enabled=True, commands=["-@write"]),
        lambda a: a.acl_setuser(USER, enabled=True, commands=["+@all"]), blocks_reads=False),
    "noperm": Fault(
        "noperm", lambda a: a.acl_setuser(USER, enabled=True, commands=["-@all"]),
        lambda a: a.acl_setuser(USER, enabled=True, commands=["+@all"]), blocks_reads=True),
}


@pytest.fixture
def server(private_redis: RedisServer) -> Iterator[RedisServer]:
    admin = redis.Redis(port=private_redis.port)
    admin.acl_setuser(USER, enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], commands=["+@all"])
    admin.close()
    yield private_redis


@pytest.fixture
def admin(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=server.port)
    yield client
    client.close()


def _index(server: RedisServer, model_id: str) -> RedisKVIndex:
    return RedisKVIndex(server.url, model_id, BLOCK, username=USER, password=PASSWORD,
                        socket_timeout=1.0, socket_connect_timeout=0.5)


def _lookup(server: RedisServer, model_id: str, hashes) -> dict[str, PrefixMatch]:
    async def main():
        index = _index(server, model_id)
        try:
            return await index.longest_prefix(hashes)
        finally:
            await index.close()

    return asyncio.run(main())


def _wait(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.02)


def _chain(seed: int, blocks: int = 6) -> list[bytes]:
    return block_hashes(list(range(seed, seed + BLOCK * blocks)), model_id="m", block_size=BLOCK)


@pytest.mark.parametrize("fault", list(FAULTS.values()), ids=list(FAULTS))
def test_every_redis_error_is_index_unavailable(server, admin, fault: Fault):
    model_id = f"m-{uuid.uuid4().hex[:6]}"
    chain = _chain(0)

    async def main():
        index = _index(server, model_id)
        try:
            await index.register_worker("w", "prefill", ttl_s=30)
            await index.store("w", "device", chain[:2])
            fault.apply(admin)
            try:
                with pytest.raises(IndexUnavailable):
                    await index.store("w", "device", chain[2:4])
                with pytest.raises(IndexUnavailable):
                    await index.register_worker("w2", "decode", ttl_s=30)
                if fault.blocks_reads:
                    with pytest.raises(IndexUnavailable):
                        await index.longest_prefix(chain)
                else:  # reads still work and see what was stored before the fault
                    assert (await index.longest_prefix(chain))["w"].matched_blocks == 2
            finally:
                fault.undo(admin)
            await index.store("w", "device", chain[2:4])
            assert (await index.longest_prefix(chain))["w"].matched_blocks == 4
        finally:
            await index.close()

    asyncio.run(main())


class Recording:
    """A policy that keeps the candidates it was offered and picks the first of each kind."""

    name = "recording"

    def route(self, request, prefill, decode, sources=()) -> RouteDecision:
        self.offered = (list(prefill), list(decode))
        return RouteDecision(prefill[0].worker_id if prefill else None, decode[0].worker_id, 0, "recorded")


@pytest.mark.parametrize("fault", [FAULTS["masterdown"], FAULTS["noperm"]], ids=["masterdown", "noperm"])
def test_routing_decides_by_load_while_the_index_fails(server, admin, fault: Fault):
    model_id = f"m-{uuid.uuid4().hex[:6]}"
    prompt = tuple(range(100, 120))  # 5 blocks
    workers = [WorkerStats("p0", "prefill", waiting=0, running=0, free_blocks=10, total_blocks=10),
               WorkerStats("d0", "decode", waiting=0, running=0, free_blocks=10, total_blocks=10)]

    async def main():
        index = _index(server, model_id)
        policy = Recording()
        routing = CacheAwareRouting(policy, index, model_id=model_id, block_size=BLOCK)
        try:
            await index.register_worker("p0", "prefill", ttl_s=30)
            await index.store("p0", "device", block_hashes(prompt, model_id=model_id, block_size=BLOCK)[:3])
            request = GenerateRequest("r", prompt)
            await routing.decide(request, workers)
            assert policy.offered[0][0].matched_blocks == 3 and routing.index_errors == 0
            fault.apply(admin)
            try:
                for _ in range(3):
                    decision = await routing.decide(request, workers)
                    assert (decision.prefill_worker, decision.decode_worker) == ("p0", "d0")
                    assert policy.offered[0][0].matched_blocks == 0  # load only
            finally:
                fault.undo(admin)
            assert routing.index_errors == 3
            await routing.decide(request, workers)
            assert policy.offered[0][0].matched_blocks == 3 and routing.index_errors == 3
        finally:
            await index.close()

    asyncio.run(main())


class Worker:
    """The engine side of a publisher: the blocks it holds, changed as the engine thread would."""

    def __init__(self, server: RedisServer, *, max_pending: int, period_s: float = 0.05) -> None:
        self.model_id = f"m-{uuid.uuid4().hex[:6]}"
        self.held: dict[str, list[bytes]] = {"device": [], "host": [], "disk": []}
        self.max_pending = max_pending
        self.peak_pending = 0
        self.publisher = IndexPublisher(lambda: _index(server, self.model_id), "w", "prefill", self.snapshot,
                                        ttl_s=30, period_s=period_s, max_pending=max_pending, max_backoff_s=0.4)

    def snapshot(self) -> dict[str, list[bytes]]:
        return {tier: list(hashes) for tier, hashes in self.held.items()}

    def store(self, tier: str, hashes) -> None:
        for h in hashes:
            self.held[tier].append(h)
            self.publisher.on_tier_event("stored", tier, h)
            self._check_bound()

    def remove(self, tier: str, hashes) -> None:
        for h in hashes:
            self.held[tier].remove(h)
            self.publisher.on_tier_event("removed", tier, h)
            self._check_bound()

    def _check_bound(self) -> None:
        self.peak_pending = max(self.peak_pending, self.publisher.pending)
        assert self.publisher.pending <= self.max_pending


@pytest.mark.parametrize("fault", [FAULTS["readonly"], FAULTS["oom"], FAULTS["noperm-write"]],
                         ids=["readonly", "oom", "noperm-write"])
def test_publisher_survives_a_fault_and_republishes_its_blocks(server, admin, fault: Fault):
    a, b = _chain(0), _chain(1000)
    worker = Worker(server, max_pending=16)
    worker.store("device", a[:3])
    worker.store("host", b[:2])
    pub = worker.publisher.start()
    try:
        _wait(lambda: pub.healthy, "the publisher registered")
        _wait(lambda: _lookup(server, worker.model_id, a).get("w", PrefixMatch("w", 0)).matched_blocks == 3,
              "the index has the first blocks")
        fault.apply(admin)
        try:
            worker.store("device", a[3:])
            _wait(lambda: not pub.healthy, "the publisher noticed the fault")
            worker.remove("host", b[:1])  # dropped while failing: the resync must forget it
            for round_ in range(5):  # far more events than the bound, while the index refuses writes
                worker.store("disk", _chain(5000 + 100 * round_, 10))
                time.sleep(0.1)
                assert not pub.healthy
            errors = pub.errors
            _wait(lambda: pub.errors > errors, "the publisher kept retrying")
        finally:
            fault.undo(admin)
        _wait(lambda: pub.healthy, "the publisher recovered", timeout=20)
        got_a, got_b = (_lookup(server, worker.model_id, c).get("w", PrefixMatch("w", 0)) for c in (a, b))
        assert got_a == PrefixMatch("w", 6, device_blocks=6)
        assert got_b.matched_blocks == 0  # its first block went while events were lost
        assert _lookup(server, worker.model_id, b[1:2])["w"] == PrefixMatch("w", 1, host_blocks=1)
        last = _chain(5400, 10)
        assert _lookup(server, worker.model_id, last)["w"] == PrefixMatch("w", 10, disk_blocks=10)
        assert worker.peak_pending <= worker.max_pending
        worker.store("device", b[:1])  # and it keeps publishing afterwards
        _wait(lambda: _lookup(server, worker.model_id, b)["w"].matched_blocks == 2, "a later event arrives")
    finally:
        pub.stop()


def test_a_burst_beyond_the_bound_forces_a_full_resync(server):
    worker = Worker(server, max_pending=8, period_s=0.5)
    pub = worker.publisher.start()
    try:
        _wait(lambda: pub.healthy, "the publisher registered")
        first = pub.republished
        chain = _chain(7, 200)
        worker.store("device", chain)  # 200 events inside one flush period
        assert pub.overflows >= 1 and worker.peak_pending <= 8
        _wait(lambda: pub.healthy and pub.republished > first, "the resync finished")
        assert _lookup(server, worker.model_id, chain)["w"] == PrefixMatch("w", 200, device_blocks=200)
    finally:
        pub.stop()
