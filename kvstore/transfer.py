"""Moving prefilled KV blocks from the worker that holds them to the worker that decodes.

``KVTransfer`` is the swappable part (local copy here; NIXL and the Ray object store in cluster mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from workers.engine.types import KVHandle

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


class LocalTransfer:
    """In-process copy between storages registered by worker id (single-process mode)."""

    name = "local"

    def __init__(self) -> None:
        self._storages: dict[str, PagedKVStorage] = {}

    def register(self, worker_id: str, storage: PagedKVStorage) -> None:
        self._storages[worker_id] = storage

    def read(self, handle: KVHandle, dst: PagedKVStorage, dst_blocks: Sequence[int]) -> None:
        src = self._storages.get(handle.worker_id)
        if src is None:
            raise TransferError(f"no storage registered for worker {handle.worker_id!r}")
        if len(dst_blocks) != len(handle.block_ids):
            raise TransferError(f"{len(dst_blocks)} destination blocks for {len(handle.block_ids)} source blocks")
        dst.write_blocks(dst_blocks, src.read_blocks(handle.block_ids))
