"""Moving prefilled KV blocks from the worker that holds them to the worker that decodes.

``KVTransfer`` is the swappable part (local copy here; NIXL and the Ray object store in cluster mode).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from kvstore.handle import KVHandle

from .block_pool import BlockPool
from .paged import PagedKVStorage


class TransferError(RuntimeError):
    """The blocks could not be read; nothing was written to the destination blocks' consumers."""


class KVTransfer(Protocol):
    """Contract: ``read(handle, dst, dst_blocks)`` copies the handle's blocks, in order, into
    ``dst_blocks`` of ``dst`` (same layout; the caller checked the fingerprint) and returns only when
    every byte has arrived, or raises TransferError. It never releases the holder's lease: the
    caller does, after reading.

    It refuses what may be another request's KV: a handle whose lease has expired before the
    bytes were all read (the holder may have reused the blocks), and, where the backend can see the
    holder's pool, blocks whose generation differs from the handle's ``block_generations``."""

    name: str

    def read(self, handle: KVHandle, dst: PagedKVStorage, dst_blocks: Sequence[int]) -> None: ...


class KVHolder(Protocol):
    """The holder's side of a backend (a prefill worker's pool), named by ``name``.

    Contract: ``endpoint(block_ids, request_id)`` is what the ``KVHandle`` of those blocks carries so a reader can
    find them (picklable and small for a zero-copy backend, which may ignore ``block_ids``; an
    object-store backend publishes the blocks' bytes here); ``read_done()``
    returns request ids whose blocks readers have finished reading since the last call (from the
    backend's notifications), so the holder can drop those leases even if no release call arrives.
    ``bind_pool(pool)`` gives the holder the pool behind its storage, once, before any endpoint:
    a backend whose reader can see the pool's generations checks them (others ignore it).
    """

    name: str

    def endpoint(self, block_ids: Sequence[int] = (), request_id: str = "") -> dict: ...

    def read_done(self) -> list[str]: ...

    def bind_pool(self, pool: BlockPool) -> None: ...


class LocalTransfer:
    """In-process copy between storages registered by worker id (single-process mode).

    The holder's pool is in this process too, so each read checks the lease and the blocks'
    generations before copying and again after: a copy during which the holder reused a block
    (another thread's engine) is discarded, never written to the destination.
    """

    name = "local"

    def __init__(self) -> None:
        self._storages: dict[str, PagedKVStorage] = {}
        self._pools: dict[str, BlockPool] = {}
        self._stats = {"backend": self.name, "bytes": 0, "transfers": 0, "failures": 0}

    def stats(self) -> dict:
        return dict(self._stats)

    def register(self, worker_id: str, storage: PagedKVStorage) -> None:
        self._storages[worker_id] = storage

    def holder(self, worker_id: str, storage: PagedKVStorage) -> "LocalHolder":
        self.register(worker_id, storage)
        return LocalHolder(worker_id, self)

    def bind_pool(self, worker_id: str, pool: BlockPool) -> None:
        self._pools[worker_id] = pool

    def read(self, handle: KVHandle, dst: PagedKVStorage, dst_blocks: Sequence[int]) -> None:
        try:
            src = self._storages.get(handle.worker_id)
            if src is None:
                raise TransferError(f"no storage registered for worker {handle.worker_id!r}")
            if len(dst_blocks) != len(handle.block_ids):
                raise TransferError(f"{len(dst_blocks)} destination blocks for {len(handle.block_ids)} source blocks")
            self._check(handle, "before")
            data = src.read_blocks(handle.block_ids)
            self._check(handle, "during")
        except TransferError:
            self._stats["failures"] += 1
            raise
        dst.write_blocks(dst_blocks, data)
        self._stats["transfers"] += 1
        self._stats["bytes"] += data.numel()

    def _check(self, handle: KVHandle, when: str) -> None:
        if time.time() >= handle.lease_expires_at:
            raise TransferError(f"lease on {handle.request_id!r}'s blocks expired {when} the read; "
                                "the holder may have reused them")
        pool = self._pools.get(handle.worker_id)
        if pool is None:
            return
        if len(handle.block_generations) != len(handle.block_ids):
            raise TransferError(f"handle of {handle.request_id!r} carries no block generations; "
                                "its blocks cannot be checked for reuse")
        if pool.generations(handle.block_ids) != handle.block_generations:
            raise TransferError(f"blocks of {handle.request_id!r} were freed or reused by the holder {when} the read")


class LocalHolder:
    """Holder side of LocalTransfer: the worker id is the whole endpoint; releases come by call."""

    name = "local"

    def __init__(self, worker_id: str, transfer: LocalTransfer | None = None) -> None:
        self.worker_id, self.transfer = worker_id, transfer

    def bind_pool(self, pool: BlockPool) -> None:
        if self.transfer is not None:
            self.transfer.bind_pool(self.worker_id, pool)

    def endpoint(self, block_ids: Sequence[int] = (), request_id: str = "") -> dict:
        return {"backend": "local", "worker_id": self.worker_id}

    def read_done(self) -> list[str]:
        return []
