"""Peer pulls: a worker reads a prompt's prefix from the worker that holds it instead of recomputing it.

Holder side (``PeerCache.export``): the blocks holding the requested hashes — from the device pool, or
restored from the host/disk tiers into fresh blocks — are leased like a prefill hand-off and
described by a ``KVHandle`` (``first_block``, ``block_hashes``). Reader side (``PeerCache.pull``):
before a request is scheduled, the handle's blocks that this worker lacks are read through its
``KVTransfer`` into fresh blocks, which are committed under the reader's *own* hashes of the prompt
(refused unless the holder's hashes equal them) and kept referenced by the sequence until its
admission takes them as its cached prefix. Any failure — a dead or busy holder, an expired lease,
reused blocks, a layout mismatch, no free blocks — frees what was taken and leaves the request to
compute its prefix itself: a pull can cost time, never correctness.

Both run on the engine thread (the commands of ``Engine``); a read blocks that thread for its duration,
as a decode worker's KV import does.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from collections.abc import Sequence as Seq

from kvstore.handle import KVHandle, LayoutFingerprint
from kvstore.hashing import BlockHash
from kvstore.transfer import KVTransfer

from .kv_manager import KVCacheManager
from .leases import LeaseTable
from .sequence import Sequence

log = logging.getLogger(__name__)


def export_id(request_id: str) -> str:
    """The lease id of a request's prefix export (distinct from its own hand-off lease)."""
    return f"{request_id}:prefix"


class PeerCache:
    """Both sides of peer pulls for one engine, and their counters (``stats``)."""

    def __init__(self, kv: KVCacheManager, leases: LeaseTable, transfer: KVTransfer | None,
                 worker_id: str, fingerprint: LayoutFingerprint) -> None:
        self.kv, self.leases, self.transfer = kv, leases, transfer
        self.worker_id, self.fingerprint = worker_id, fingerprint
        self.pulled_blocks = self.pulled_bytes = self.pull_failures = self.exported_blocks = 0

    def stats(self) -> dict[str, int]:
        return {"pulled_blocks": self.pulled_blocks, "pulled_bytes": self.pulled_bytes,
                "pull_failures": self.pull_failures, "exported_blocks": self.exported_blocks}

    # ------------------------------------------------------------------ holder
    def export(self, request_id: str, hashes: Seq[BlockHash], first_block: int) -> KVHandle | None:
        """Lease the longest prefix of ``hashes`` this worker holds (any tier) → a handle, or None
        when it holds none of it (or cannot lease it now)."""
        blocks = self.kv.pool.acquire_prefix(hashes, self.kv.restore)
        if not blocks:
            return None
        try:
            handle = self.leases.export(export_id(request_id), blocks, tuple(hashes[: len(blocks)]), first_block,
                                        self.worker_id, self.fingerprint)
        except Exception:
            self.kv.pool.release(blocks)
            raise
        self.exported_blocks += len(blocks)
        return handle

    def serve_export(self, request_id: str, hashes: Seq[BlockHash], first_block: int,
                     sink: Callable[[KVHandle | None], None]) -> None:
        """``export``, its handle (or None) handed to ``sink``; a failing sink ends the lease at once."""
        handle = self.export(request_id, hashes, first_block)
        try:
            sink(handle)
        except Exception:  # the caller is gone: nobody will read the blocks
            if handle is not None:
                self.leases.release(handle.request_id)
            raise

    # ------------------------------------------------------------------ reader
    def pull(self, seq: Sequence, handle: KVHandle) -> None:
        """Read the handle's blocks that this worker lacks into fresh blocks committed under ``seq``'s
        prompt hashes; ``seq.held_blocks`` keeps them until admission. Failures are logged and counted."""
        try:
            self._pull(seq, handle)
        except Exception as e:  # noqa: BLE001 — any failure: the request computes its prefix itself
            self.pull_failures += 1
            log.warning("peer pull of %s from %s failed (%s: %s); computing the prefix instead",
                        seq.request_id, handle.worker_id, type(e).__name__, e)

    def _pull(self, seq: Sequence, handle: KVHandle) -> None:
        if handle.fingerprint != self.fingerprint:
            raise ValueError(f"KV layout mismatch: holder {handle.fingerprint} vs this worker {self.fingerprint}")
        if self.transfer is None:
            raise ValueError(f"worker {self.worker_id} has no KV transfer backend")
        bs = self.kv.block_size
        mine = seq.full_block_hashes(bs, len(seq.token_ids) - 1)  # at least one token is always computed
        first, n = handle.first_block, len(handle.block_ids)
        if n == 0 or first + n > len(mine) or tuple(mine[first : first + n]) != tuple(handle.block_hashes):
            raise ValueError(f"exported blocks {first}..{first + n - 1} are not this prompt's blocks")
        pool = self.kv.pool
        missing = [i for i in range(n) if mine[first + i] not in pool.hash_to_block]
        if not missing:
            return
        if not pool.can_allocate(len(missing)):
            raise MemoryError(f"no room for {len(missing)} pulled blocks ({pool.num_free} free)")
        part = dataclasses.replace(handle, block_ids=tuple(handle.block_ids[i] for i in missing),
                                   block_generations=tuple(handle.block_generations[i] for i in missing)
                                   if handle.block_generations else ())
        blocks = pool.allocate(len(missing))
        try:
            self.transfer.read(part, self.kv.storage, blocks)
        except BaseException:
            pool.release(blocks)
            raise
        for i, block in zip(missing, blocks):
            pool.commit(block, mine[first + i])
        seq.held_blocks.extend(blocks)
        self.pulled_blocks += len(blocks)
        self.pulled_bytes += len(blocks) * self.kv.layout.bytes_per_block
