"""The two sides of a KV hand-off: ``LeaseTable`` (prefill keeps blocks until they are read) and
``KVImporter`` (decode pulls a handle's blocks through a ``KVTransfer``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvstore.handle import KVHandle, LayoutFingerprint
from kvstore.hashing import BlockHash
from kvstore.transfer import KVHolder, KVTransfer, TransferError

from .kv_manager import KVCacheManager
from .sequence import Sequence
from .types import GenerateRequest, RequestOutput

log = logging.getLogger(__name__)
Sink = Callable[[RequestOutput | KVHandle], None]


class LeaseTable:
    """Blocks held for a reader, until released or expired: a prefilled sequence's (``hand_off``) or
    a prompt prefix another worker pulls (``export``)."""

    def __init__(self, kv: KVCacheManager, lease_s: float, holder: KVHolder | None) -> None:
        self.kv, self.lease_s, self.holder = kv, lease_s, holder
        self._leases: dict[str, tuple[list[int], float]] = {}  # lease id → (referenced blocks, expiry)

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._leases

    def hand_off(self, seq: Sequence, worker_id: str, fingerprint: LayoutFingerprint) -> KVHandle:
        """Lease ``seq``'s blocks (it has its first token) and describe them as a handle. If this
        raises (e.g. the holder cannot publish), no lease was taken: the blocks are still ``seq``'s."""
        expires = time.time() + self.lease_s
        handle = KVHandle(
            worker_id=worker_id, request_id=seq.request_id, block_ids=tuple(seq.block_table),
            num_tokens=seq.num_computed_tokens, first_token=seq.token_ids[-1], fingerprint=fingerprint,
            lease_expires_at=expires, cached_tokens=seq.num_cached_tokens,
            first_logprob=seq.logprobs[0] if seq.logprobs else None,
            endpoint=self.holder.endpoint(seq.block_table, seq.request_id) if self.holder else {},
            block_generations=self.kv.pool.generations(seq.block_table),
        )
        self._leases[seq.request_id] = (seq.block_table, expires)
        return handle

    def export(self, lease_id: str, blocks: list[int], hashes: tuple[BlockHash, ...], first_block: int,
               worker_id: str, fingerprint: LayoutFingerprint) -> KVHandle:
        """Lease ``blocks`` (one reference each, taken by the caller) holding prompt blocks
        ``first_block ..`` with ``hashes``, and describe them for a peer. If this raises, the caller
        still owns the references."""
        expires = time.time() + self.lease_s
        handle = KVHandle(
            worker_id=worker_id, request_id=lease_id, block_ids=tuple(blocks), num_tokens=0, first_token=-1,
            fingerprint=fingerprint, lease_expires_at=expires,
            endpoint=self.holder.endpoint(blocks, lease_id) if self.holder else {},
            block_generations=self.kv.pool.generations(blocks), first_block=first_block, block_hashes=hashes,
        )
        self._leases[lease_id] = (blocks, expires)
        return handle

    def release(self, request_id: str) -> None:
        lease = self._leases.pop(request_id, None)
        if lease is not None:
            self.kv.pool.release(lease[0])

    def clear(self) -> None:
        """Forget every lease without freeing (the pool is being reset)."""
        self._leases.clear()

    def expire(self) -> None:
        """Release what readers reported done, and every lease past its time."""
        if self.holder is not None:
            for rid in self.holder.read_done():
                self.release(rid)
        now = time.time()
        for rid, (_, expires) in list(self._leases.items()):
            if expires < now:
                self.release(rid)


@dataclass
class KVImport:
    """A decode request waiting for its prefilled blocks."""

    request: GenerateRequest
    handle: KVHandle
    sink: Sink
    on_read: Callable[[Exception | None], None]

    def notify(self, err: Exception | None) -> None:
        try:
            self.on_read(err)
        except Exception:  # the caller is gone; its request is dropped by the next send
            log.info("caller of %s is gone", self.request.request_id)


class KVImporter:
    """Pulls handles' blocks into fresh local blocks; a failure is reported, never decoded."""

    def __init__(self, kv: KVCacheManager, fingerprint: LayoutFingerprint, transfer: KVTransfer | None,
                 worker_id: str, capacity_error: Callable[[GenerateRequest], str | None]) -> None:
        self.kv, self.fingerprint, self.transfer = kv, fingerprint, transfer
        self.worker_id, self.capacity_error = worker_id, capacity_error
        self.pending: list[KVImport] = []

    def __len__(self) -> int:
        return len(self.pending)

    def drop(self, request_id: str) -> None:
        self.pending = [imp for imp in self.pending if imp.request.request_id != request_id]

    def fail_all(self, message: str) -> None:
        for imp in self.pending:
            imp.notify(TransferError(message))
        self.pending = []

    def poll(self) -> list[tuple[KVImport, list[int]]]:
        """Try every pending import → the ones read, with their local blocks (the rest wait for blocks)."""
        done, waiting = [], []
        for imp in self.pending:
            blocks = self._pull(imp)
            if blocks is False:
                waiting.append(imp)
            elif blocks is not None:
                done.append((imp, blocks))
        self.pending = waiting
        return done

    def _pull(self, imp: KVImport) -> list[int] | None | bool:
        """Local blocks holding the handle's KV; None after a reported failure; False: retry later."""
        handle = imp.handle
        if handle.fingerprint != self.fingerprint:
            imp.notify(TransferError(f"KV layout mismatch: holder {handle.fingerprint} vs this worker {self.fingerprint}"))
            return None
        if self.transfer is None:
            imp.notify(TransferError(f"worker {self.worker_id} has no KV transfer backend"))
            return None
        error = self.capacity_error(imp.request)
        if error:
            imp.notify(TransferError(error))
            return None
        pool = self.kv.pool
        if not pool.can_allocate(len(handle.block_ids)):
            return False
        blocks = pool.allocate(len(handle.block_ids))
        try:
            self.transfer.read(handle, self.kv.storage, blocks)
        except Exception as e:  # any failure: free what we took, report, never decode garbage
            pool.release(blocks)
            imp.notify(e if isinstance(e, TransferError) else TransferError(str(e)))
            return None
        return blocks
