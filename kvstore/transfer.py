"""Moving prefilled KV blocks from the worker that holds them to the worker that decodes.

``KVTransfer`` is the swappable part (local copy here; NIXL and the Ray object store in cluster mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kvstore.handle import KVHandle

from .paged import PagedKVStorage


class TransferError(RuntimeError):
    """The blocks could not be read; nothing was written to the destination blocks' consumers."""


class KVTransfer(Protocol):
    """Contract: ``read(handle, dst, dst_blocks)`` copies the handle's blocks, in order, into
    ``dst_blocks`` of ``dst`` (same layout; the caller checked the fingerprint) and returns only when
    every byte has arrived, or raises TransferError. It never releases the holder's lease: the
    caller does, after reading."""

    name: str

    def read(self, handle: KVHandle, dst: PagedKVStorage, dst_blocks: Sequence[int]) -> None: ...


class KVHolder(Protocol):
    """The holder's side of a backend (a prefill worker's pool), named by ``name``.

    Contract: ``endpoint(block_ids, request_id)`` is what the ``KVHandle`` of those blocks carries so a reader can
    find them (picklable and small for a zero-copy backend, which may ignore ``block_ids``; an
    object-store backend publishes the blocks' bytes here); ``read_done()``
    returns request ids whose blocks readers have finished reading since the last call (from the
    backend's notifications), so the holder can drop those leases even if no release call arrives.
    """

    name: str

    def endpoint(self, block_ids: Sequence[int] = (), request_id: str = "") -> dict: ...

    def read_done(self) -> list[str]: ...


class LocalTransfer:
    """In-process copy between storages registered by worker id (single-process mode)."""

    name = "local"

    def __init__(self) -> None:
        self._storages: dict[str, PagedKVStorage] = {}
        self._stats = {"backend": self.name, "bytes": 0, "transfers": 0, "failures": 0}

    def stats(self) -> dict:
        return dict(self._stats)

    def register(self, worker_id: str, storage: PagedKVStorage) -> None:
        self._storages[worker_id] = storage

    def holder(self, worker_id: str, storage: PagedKVStorage) -> "LocalHolder":
        self.register(worker_id, storage)
        return LocalHolder(worker_id)

    def read(self, handle: KVHandle, dst: PagedKVStorage, dst_blocks: Sequence[int]) -> None:
        src = self._storages.get(handle.worker_id)
        if src is None or len(dst_blocks) != len(handle.block_ids):
            self._stats["failures"] += 1
            if src is None:
                raise TransferError(f"no storage registered for worker {handle.worker_id!r}")
            raise TransferError(f"{len(dst_blocks)} destination blocks for {len(handle.block_ids)} source blocks")
        data = src.read_blocks(handle.block_ids)
        dst.write_blocks(dst_blocks, data)
        self._stats["transfers"] += 1
        self._stats["bytes"] += data.numel()


class LocalHolder:
    """Holder side of LocalTransfer: the worker id is the whole endpoint; releases come by call."""

    name = "local"

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id

    def endpoint(self, block_ids: Sequence[int] = (), request_id: str = "") -> dict:
        return {"backend": "local", "worker_id": self.worker_id}

    def read_done(self) -> list[str]:
        return []
