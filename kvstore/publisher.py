"""IndexPublisher: keeps a KV index in step with one worker's blocks.

The engine thread reports block events (device tier from the BlockPool, host/disk from the context
cache); the publisher batches them and sends them from its own thread and event loop. It registers
the worker, heartbeats within the TTL, and when the index lost the worker (expired, or Redis came
back empty) or was unreachable, it re-registers and re-publishes every block the worker holds —
requests never wait on the index.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from .hashing import BlockHash
from .index import IndexUnavailable, KVIndex, Tier, WorkerNotRegistered, WorkerRole

log = logging.getLogger(__name__)

Snapshot = Callable[[], dict[Tier, list[BlockHash]]]


class IndexPublisher:
    """Runs on a daemon thread; ``stop()`` ends it. ``snapshot()`` lists every held block per tier."""

    def __init__(self, make_index: Callable[[], KVIndex], worker_id: str, role: WorkerRole, snapshot: Snapshot,
                 *, ttl_s: float = 10.0, period_s: float = 0.1) -> None:
        self._make_index = make_index
        self.worker_id, self.role, self.ttl_s, self.period_s = worker_id, role, ttl_s, period_s
        self._snapshot = snapshot
        self._lock = threading.Lock()
        self._pending: list[tuple[str, Tier, BlockHash]] = []
        self._stop = threading.Event()
        self.healthy = False  # the index has this worker's current blocks
        self.republished = 0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True,
                                        name=f"{worker_id}-index")

    def start(self) -> "IndexPublisher":
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    # Called from the engine thread.
    def on_block_event(self, kind: str, block_hash: BlockHash) -> None:
        with self._lock:
            self._pending.append((kind, "device", block_hash))

    def on_tier_event(self, kind: str, tier: Tier, block_hash: BlockHash) -> None:
        with self._lock:
            self._pending.append((kind, tier, block_hash))

    async def _run(self) -> None:
        index = self._make_index()
        await self._recover(index)
        beat_every = max(self.ttl_s / 3, self.period_s)
        loop = asyncio.get_running_loop()
        last_beat = loop.time()
        while not self._stop.is_set():
            await asyncio.sleep(self.period_s)
            try:
                if not self.healthy:
                    await self._recover(index)
                    continue
                if loop.time() - last_beat >= beat_every:
                    last_beat = loop.time()
                    if not await index.heartbeat(self.worker_id):
                        self.healthy = False  # expired, or the index restarted empty
                        continue
                await self._flush(index)
            except (IndexUnavailable, WorkerNotRegistered) as e:
                if self.healthy:
                    log.warning("KV index lost for %s (%s); will re-publish", self.worker_id, e)
                self.healthy = False
        try:
            await index.clear_worker(self.worker_id)
            await index.close()
        except Exception:  # shutting down: the TTL cleans up what we could not
            pass

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

    async def _recover(self, index: KVIndex) -> None:
        try:
            await index.check_hash_agreement()
            await index.register_worker(self.worker_id, self.role, self.ttl_s)
            with self._lock:
                self._pending.clear()  # the snapshot below supersedes them
                snapshot = self._snapshot()
            for tier, hashes in snapshot.items():
                if hashes:
                    await index.store(self.worker_id, tier, hashes)
            self.healthy = True
            self.republished += 1
        except IndexUnavailable:
            self.healthy = False
