"""KVIndex: which live worker holds which KV block, on which tier — the cluster's view of its caches.

Workers publish "stored"/"removed" block events (from their BlockPool and tiers); the router asks for
the longest cached prefix of a prompt on every live worker and routes by it. ``InMemoryKVIndex`` serves
local mode and the routing simulation; ``kvstore.redis_index.RedisKVIndex`` serves a cluster.

Keys are namespaced by model id, block size and hash version, so two models, block sizes or hash
algorithms can never match each other's blocks; ``check_hash_agreement`` makes every process prove at
start that it hashes like the processes before it (a silent mismatch is a 0 % hit rate).
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from .hashing import HASH_ALGORITHM, HASH_VERSION, BlockHash, block_hashes, self_test

Tier = Literal["device", "host", "disk"]
TIERS: tuple[Tier, ...] = ("device", "host", "disk")  # fastest first
WorkerRole = Literal["prefill", "decode", "both", "volume"]  # volume: a shared disk cache folder (no engine)
EventKind = Literal["stored", "removed"]
Hasher = Callable[..., list[BlockHash]]  # the signature of ``kvstore.hashing.block_hashes``


class IndexUnavailable(RuntimeError):
    """The index backend cannot serve the call (unreachable, read-only after a failover, out of memory,
    refused by its ACL, ...); route by load only until it answers again."""


class WorkerNotRegistered(KeyError):
    """The worker is unknown or its TTL ran out (or the index restarted empty): re-register it and
    re-publish all of its blocks."""


class HashAgreementError(RuntimeError):
    """This process hashes blocks differently from the processes that already use the index."""


@dataclass(frozen=True)
class PrefixMatch:
    """How many leading blocks of a prompt one worker holds; per tier, where each matched block's
    fastest copy lives (``device_blocks + host_blocks + disk_blocks == matched_blocks``)."""

    worker_id: str
    matched_blocks: int
    device_blocks: int = 0
    host_blocks: int = 0
    disk_blocks: int = 0


@dataclass(frozen=True)
class WorkerInfo:
    """A live worker: its role and the TTL its heartbeats must beat."""

    worker_id: str
    role: WorkerRole
    ttl_s: float


@dataclass(frozen=True)
class IndexEvent:
    """A batch of blocks that became findable ("stored") or stopped being findable ("removed")."""

    kind: EventKind
    worker_id: str
    tier: Tier
    hashes: tuple[BlockHash, ...]


def volume_worker_id(volume_id: str) -> str:
    """The index entry of a shared disk cache folder (``kvstore.shared_disk``): every process that
    mounts it publishes its blocks there, and the router credits them to every worker on that volume."""
    return f"volume-{volume_id}"


def namespace(model_id: str, block_size: int) -> str:
    """The key prefix of one model, block size and hash version. The braces are a Redis Cluster hash
    tag: every key of a namespace lives in one slot, so one Lua script may touch them all."""
    return f"dsaserve:kv:{{{model_id}:bs{block_size}:{HASH_ALGORITHM}v{HASH_VERSION}}}"


def agreement_digest(model_id: str, block_size: int, hasher: Hasher = block_hashes) -> str:
    """A known-answer digest of this process's hashing for the namespace (two fixed full blocks)."""
    tokens = list(range(2 * block_size))
    return hasher(tokens, model_id=model_id, cache_salt=None, block_size=block_size)[1].hex()[:16]


def process_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def agreement_key(model_id: str, block_size: int) -> str:
    """Where the known answer lives: outside the versioned namespace, so that a process with another
    hash version is caught too (it would otherwise read an empty namespace: a silent 0 % hit rate)."""
    return f"dsaserve:kv:hash-check:{model_id}:bs{block_size}"


def agreement_record(digest: str) -> str:
    return f"{HASH_ALGORITHM}|{HASH_VERSION}|{digest}|{process_label()}"


def check_agreement_record(stored: str, mine: str, model_id: str, block_size: int) -> None:
    """Raise ``HashAgreementError`` unless ``stored`` (an ``agreement_record``) matches ``mine``."""
    algorithm, version, theirs, writer = stored.split("|", 3)
    if (algorithm, version, theirs) != (HASH_ALGORITHM, str(HASH_VERSION), mine):
        raise HashAgreementError(
            f"block hash disagreement for model {model_id!r}, block size {block_size}: this process "
            f"({process_label()}) computes {mine} with {HASH_ALGORITHM} v{HASH_VERSION}; the index holds "
            f"{theirs} with {algorithm} v{version}, written by {writer}. Router, workers and index would "
            "never agree on cached blocks: run one dsaserve version everywhere (after an intended upgrade, "
            f"delete the key {agreement_key(model_id, block_size)!r})"
        )


class KVIndex(Protocol):
    """Where KV blocks live across the cluster.

    Contract:
    - A worker counts (in ``longest_prefix`` and ``workers``) from ``register_worker`` until its TTL
      passes without a ``heartbeat``, or until ``clear_worker``. An expired worker's blocks are
      forgotten with it. ``heartbeat`` returns False when the worker is not registered (expired, or
      the index restarted empty): the worker must register again and re-publish all of its blocks.
    - ``store``/``remove`` record that a worker holds (or no longer holds) blocks on a tier; both are
      idempotent, a block may sit on several tiers, and both raise ``WorkerNotRegistered`` for a worker
      that does not count. Each call that changes something appends one ``IndexEvent``
      (``clear_worker`` and expiry append none: consumers learn of them from ``workers()``).
    - ``longest_prefix(hashes)`` answers, for every live worker, how many leading blocks of ``hashes``
      it holds on any tier (0 included), in one round trip; per tier counts use each block's fastest tier.
    - ``check_hash_agreement`` stores this process's known-answer digest if none exists, and raises
      ``HashAgreementError`` naming both digests and the hash version if a different one exists.
    - Every method raises ``IndexUnavailable`` (and nothing backend-specific) for any backend failure,
      not only an unreachable backend; callers then route by load only.
    """

    model_id: str
    block_size: int

    async def register_worker(self, worker_id: str, role: WorkerRole, ttl_s: float = 10.0) -> None: ...

    async def heartbeat(self, worker_id: str) -> bool: ...

    async def store(self, worker_id: str, tier: Tier, hashes: Sequence[BlockHash]) -> None: ...

    async def remove(self, worker_id: str, tier: Tier, hashes: Sequence[BlockHash]) -> None: ...

    async def clear_worker(self, worker_id: str) -> None: ...

    async def longest_prefix(self, hashes: Sequence[BlockHash]) -> dict[str, PrefixMatch]: ...

    async def workers(self) -> list[WorkerInfo]: ...

    async def recent_events(self, count: int = 100) -> list[IndexEvent]: ...

    async def check_hash_agreement(self) -> None: ...

    async def close(self) -> None: ...


class BlockLocations:
    """The synchronous core of the in-memory index: block → {worker: tier bitmask}.

    No clocks and no liveness: ``InMemoryKVIndex`` adds those; the routing simulation uses this
    directly. Keys may be any hashable (the simulation uses the trace's integer block ids).
    """

    def __init__(self) -> None:
        self._holders: dict[Hashable, dict[str, int]] = {}
        self._held: dict[str, set[Hashable]] = {}

    def store(self, worker_id: str, tier_bit: int, hashes: Iterable[Hashable]) -> int:
        """Set ``tier_bit`` on each block for the worker; returns how many blocks changed."""
        held = self._held.setdefault(worker_id, set())
        changed = 0
        for h in hashes:
            masks = self._holders.setdefault(h, {})
            old = masks.get(worker_id, 0)
            if not old & tier_bit:
                masks[worker_id] = old | tier_bit
                held.add(h)
                changed += 1
        return changed

    def remove(self, worker_id: str, tier_bit: int, hashes: Iterable[Hashable]) -> int:
        changed = 0
        for h in hashes:
            masks = self._holders.get(h)
            old = 0 if masks is None else masks.get(worker_id, 0)
            if old & tier_bit:
                changed += 1
                if old == tier_bit:
                    del masks[worker_id]
                    self._held[worker_id].discard(h)
                    if not masks:
                        del self._holders[h]
                else:
                    masks[worker_id] = old & ~tier_bit
        return changed

    def clear_worker(self, worker_id: str) -> None:
        for h in self._held.pop(worker_id, ()):
            masks = self._holders[h]
            del masks[worker_id]
            if not masks:
                del self._holders[h]

    def num_blocks(self, worker_id: str) -> int:
        return len(self._held.get(worker_id, ()))

    def longest_prefix(self, hashes: Sequence[Hashable], workers: Iterable[str]) -> dict[str, list[int]]:
        """For each of ``workers``: [matched, per tier counts (fastest tier)...]. Cost: O(Σ matched)."""
        out = {w: [0] * (1 + len(TIERS)) for w in workers}
        alive = set(out)
        for h in hashes:
            masks = self._holders.get(h)
            if not masks:
                break
            alive = {w for w in alive if w in masks}
            if not alive:
                break
            for w in alive:
                mask = masks[w]
                row = out[w]
                row[0] += 1
                row[1 + (mask & -mask).bit_length() - 1] += 1  # lowest set bit = fastest tier
        return out


def tier_bit(tier: Tier) -> int:
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
    return 1 << TIERS.index(tier)


class InMemoryKVIndex:
    """``KVIndex`` in this process (local mode, tests). ``peer(hasher=...)`` gives a second view of the
    same state, as another process would see it (used to test hash agreement)."""

    def __init__(
        self,
        model_id: str,
        block_size: int = 64,
        *,
        hasher: Hasher = block_hashes,
        clock: Callable[[], float] = time.monotonic,
        max_events: int = 10_000,
    ) -> None:
        self.model_id = model_id
        self.block_size = block_size
        self.namespace = namespace(model_id, block_size)
        self._hasher = hasher
        self._clock = clock
        self._locations = BlockLocations()
        self._workers: dict[str, tuple[WorkerInfo, float]] = {}  # id → (info, expires_at)
        self._events: deque[IndexEvent] = deque(maxlen=max_events)
        self._agreement: dict[str, str] = {}  # agreement key → record; shared with peers

    def peer(self, *, hasher: Hasher = block_hashes) -> "InMemoryKVIndex":
        other = InMemoryKVIndex(self.model_id, self.block_size, hasher=hasher, clock=self._clock)
        for shared in ("_locations", "_workers", "_events", "_agreement"):
            setattr(other, shared, getattr(self, shared))
        return other

    def _expire(self) -> None:
        now = self._clock()
        for wid in [w for w, (_, exp) in self._workers.items() if exp <= now]:
            del self._workers[wid]
            self._locations.clear_worker(wid)

    def _live(self, worker_id: str) -> WorkerInfo:
        self._expire()
        if worker_id not in self._workers:
            raise WorkerNotRegistered(worker_id)
        return self._workers[worker_id][0]

    async def register_worker(self, worker_id: str, role: WorkerRole, ttl_s: float = 10.0) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self._expire()
        self._workers[worker_id] = (WorkerInfo(worker_id, role, float(ttl_s)), self._clock() + ttl_s)

    async def heartbeat(self, worker_id: str) -> bool:
        try:
            info = self._live(worker_id)
        except WorkerNotRegistered:
            return False
        self._workers[worker_id] = (info, self._clock() + info.ttl_s)
        return True

    async def store(self, worker_id: str, tier: Tier, hashes: Sequence[BlockHash]) -> None:
        self._live(worker_id)
        if self._locations.store(worker_id, tier_bit(tier), hashes):
            self._events.append(IndexEvent("stored", worker_id, tier, tuple(hashes)))

    async def remove(self, worker_id: str, tier: Tier, hashes: Sequence[BlockHash]) -> None:
        self._live(worker_id)
        if self._locations.remove(worker_id, tier_bit(tier), hashes):
            self._events.append(IndexEvent("removed", worker_id, tier, tuple(hashes)))

    async def clear_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)
        self._locations.clear_worker(worker_id)

    async def longest_prefix(self, hashes: Sequence[BlockHash]) -> dict[str, PrefixMatch]:
        self._expire()
        rows = self._locations.longest_prefix(hashes, self._workers)
        return {w: PrefixMatch(w, *row) for w, row in rows.items()}

    async def workers(self) -> list[WorkerInfo]:
        self._expire()
        return [info for info, _ in self._workers.values()]

    async def recent_events(self, count: int = 100) -> list[IndexEvent]:
        return list(self._events)[-count:]

    async def check_hash_agreement(self) -> None:
        self_test()
        mine = agreement_digest(self.model_id, self.block_size, self._hasher)
        stored = self._agreement.setdefault(agreement_key(self.model_id, self.block_size), agreement_record(mine))
        check_agreement_record(stored, mine, self.model_id, self.block_size)

    async def close(self) -> None:
        """Nothing to release (the protocol's symmetry with the Redis index)."""
