"""IndexPublisher: keeps a KV index in step with one worker's blocks.

The engine thread reports block events (device tier from the BlockPool, host/disk from the context
cache); the publisher batches them and sends them from its own thread and event loop, so requests
never wait on the index. It registers the worker and heartbeats within the TTL.

Whenever the index may have diverged from the worker — at start, after any failed call (Redis
unreachable, READONLY after a failover, OOM, NOPERM, or anything unexpected), when the index forgot
the worker (TTL ran out, Redis came back empty), or when more than ``max_pending`` events piled up —
the publisher stops queueing events and *resyncs*: it drops what the index holds for the worker,
registers it again and stores the full ``snapshot()`` of its blocks. Failed attempts back off
exponentially up to ``max_backoff_s`` and reconnect (a new index from ``make_index``). ``healthy`` is
True exactly while the last resync succeeded and nothing has failed since, i.e. while the index
holds this worker's blocks (up to the events still queued).

A *shared* publisher (``shared=True``) speaks for an index entry several processes publish, such as a
disk cache folder all of them read and write (``kvstore.shared_disk``): it never clears the entry,
neither on a resync (the others' blocks are in it too; its snapshot re-stores what the folder holds)
nor on stop (the folder outlives any one process; the entry expires when no process heartbeats it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from .hashing import BlockHash
from .index import KVIndex, Tier, WorkerNotRegistered, WorkerRole

log = logging.getLogger(__name__)

Snapshot = Callable[[], dict[Tier, list[BlockHash]]]
STORE_CHUNK = 8192  # blocks per store call of a resync: one Redis call stays small


class IndexPublisher:
    """Runs on a daemon thread; ``stop()`` ends it. ``snapshot()`` lists every held block per tier.

    Counters for status and tests: ``republished`` (successful resyncs), ``errors`` (failed index
    calls), ``overflows`` (times the event queue hit ``max_pending`` and was dropped for a resync).
    """

    def __init__(self, make_index: Callable[[], KVIndex], worker_id: str, role: WorkerRole, snapshot: Snapshot,
                 *, ttl_s: float = 10.0, period_s: float = 0.1, max_pending: int = 100_000,
                 max_backoff_s: float = 5.0, shared: bool = False) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be ≥ 1, got {max_pending}")
        self._make_index = make_index
        self.worker_id, self.role, self.ttl_s, self.period_s = worker_id, role, ttl_s, period_s
        self.max_pending, self.max_backoff_s = max_pending, max(max_backoff_s, period_s)
        self._snapshot = snapshot
        self.shared = shared
        self._lock = threading.Lock()  # guards _pending, _resync and healthy
        self._pending: list[tuple[str, Tier, BlockHash]] = []
        self._resync = True  # the index may differ from the worker: send a full snapshot
        self._stop = threading.Event()
        self.healthy = False  # the index has this worker's current blocks
        self.republished = self.errors = self.overflows = 0
        self._failures = 0  # consecutive, since the last successful resync
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True,
                                        name=f"{worker_id}-index")

    def start(self) -> "IndexPublisher":
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def pending(self) -> int:
        """Events queued and not yet sent (never more than ``max_pending``)."""
        return len(self._pending)

    # Called from the engine thread.
    def on_block_event(self, kind: str, block_hash: BlockHash) -> None:
        self.on_tier_event(kind, "device", block_hash)

    def on_tier_event(self, kind: str, tier: Tier, block_hash: BlockHash) -> None:
        with self._lock:
            if self._resync:  # the coming snapshot already includes this change
                return
            if len(self._pending) >= self.max_pending:  # the index falls behind: resync instead of growing
                self._pending.clear()
                self._resync, self.healthy = True, False
                self.overflows += 1
                return
            self._pending.append((kind, tier, block_hash))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        beat_every = max(self.ttl_s / 3, self.period_s)
        index: KVIndex | None = None
        last_beat, backoff = loop.time(), 0.0
        while not self._stop.is_set():
            try:
                if index is None:
                    index = self._make_index()
                if self._resync:
                    await self._resync_all(index)
                    last_beat = loop.time()
                elif loop.time() - last_beat >= beat_every:
                    last_beat = loop.time()
                    if not await index.heartbeat(self.worker_id):
                        raise WorkerNotRegistered("expired, or the index restarted empty")
                await self._flush(index)
                backoff = 0.0
            except WorkerNotRegistered as e:  # reachable but forgot us: resync at once
                self._lost(e)
            except Exception as e:  # noqa: BLE001 — whatever failed, the publisher lives and retries
                self.errors += 1
                self._lost(e)
                backoff = min(max(2 * backoff, self.period_s), self.max_backoff_s)
                index = await _close(index)  # reconnect on the next try
            await self._pause(backoff or self.period_s)
        if index is not None:
            try:
                if not self.shared:
                    await index.clear_worker(self.worker_id)
            except Exception:  # noqa: BLE001 — shutting down: the TTL cleans up what we could not
                pass
            await _close(index)

    def _lost(self, error: BaseException) -> None:
        with self._lock:
            self._pending.clear()
            self._resync, self.healthy = True, False
        self._failures += 1
        if self._failures == 1:  # once per outage, not once per retry
            log.warning("KV index failing for %s (%s); will re-publish when it answers", self.worker_id, error)
        else:
            log.debug("KV index still failing for %s: %s", self.worker_id, error)

    async def _pause(self, seconds: float) -> None:
        """Sleep, waking early when stopped (backoff may be seconds long)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while not self._stop.is_set() and (left := end - loop.time()) > 0:
            await asyncio.sleep(min(left, 0.05))

    async def _flush(self, index: KVIndex) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        # Group consecutive events of the same kind and tier into one call each.
        start = 0
        while start < len(batch):
            kind, tier, _ = batch[start]
            end = start
            while end < len(batch) and batch[end][:2] == (kind, tier):
                end += 1
            hashes = [h for _, _, h in batch[start:end]]
            if kind == "stored":
                await index.store(self.worker_id, tier, hashes)
            else:
                await index.remove(self.worker_id, tier, hashes)
            start = end

    async def _resync_all(self, index: KVIndex) -> None:
        """Replace what the index holds for this worker by its full snapshot."""
        await index.check_hash_agreement()
        if not self.shared:
            await index.clear_worker(self.worker_id)  # blocks dropped while events were lost must not linger
        await index.register_worker(self.worker_id, self.role, self.ttl_s)
        with self._lock:
            snapshot = self._snapshot()
            self._pending.clear()  # the snapshot supersedes them; later events queue behind it
            self._resync = False
        for tier, hashes in snapshot.items():
            for i in range(0, len(hashes), STORE_CHUNK):
                await index.store(self.worker_id, tier, hashes[i : i + STORE_CHUNK])
        with self._lock:
            self.healthy = not self._resync  # an overflow during the stores asks for another resync
        self.republished += 1
        self._failures = 0
        log.info("KV index: %s published %d blocks", self.worker_id, sum(map(len, snapshot.values())))


async def _close(index: KVIndex | None) -> None:
    if index is not None:
        try:
            await index.close()
        except Exception:  # noqa: BLE001 — a broken connection may fail to close; it is dropped anyway
            pass
    return None
