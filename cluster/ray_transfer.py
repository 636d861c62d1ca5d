"""KV transfer through the Ray object store (the ``ray`` backend: no NIXL needed).

At hand-off the holder copies the blocks' bytes into the object store and publishes the ObjectRef in
the handle; it can drop its lease at once (the bytes are already out). The reader ``ray.get``s them.

Reuse of the holder's blocks cannot reach a reader: the copy is taken on the engine thread while the
blocks are held. The reader still honours the lease like every backend (a handle past
``lease_expires_at`` is refused, so no backend serves stale handles) and refuses a payload whose
size does not match the handle's blocks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import ray
import torch

from kvstore.block_pool import BlockPool
from kvstore.paged import PagedKVStorage
from kvstore.transfer import TransferError
from workers.engine.types import KVHandle


class RayHolder:
    """Holder side: publishes block bytes as an object; the lease ends on the next engine step."""

    name = "ray"

    def __init__(self, storage: PagedKVStorage) -> None:
        self.storage = storage
        self._done: list[str] = []
        self._stats = {"backend": self.name, "bytes": 0, "transfers": 0, "failures": 0}

    def stats(self) -> dict:
        return dict(self._stats)

    def endpoint(self, block_ids: Sequence[int] = (), request_id: str = "") -> dict:
        data = self.storage.read_blocks(block_ids).numpy()
        ref = ray.put(data)
        self._stats["transfers"] += 1
        self._stats["bytes"] += int(data.nbytes)
        if request_id:
            self._done.append(request_id)
        return {"backend": "ray", "ref": ref, "nbytes": int(data.nbytes)}

    def bind_pool(self, pool: BlockPool) -> None:
        """Not needed: the bytes are copied out while the blocks are held."""

    def read_done(self) -> list[str]:
        done, self._done = self._done, []
        return done


class RayTransfer:
    """Reader side: ``ray.get`` the published bytes into the destination blocks."""

    name = "ray"

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._stats = {"backend": self.name, "bytes": 0, "transfers": 0, "failures": 0}

    def read(self, handle: KVHandle, dst: PagedKVStorage, dst_blocks: Sequence[int]) -> None:
        ep = handle.endpoint
        try:
            if ep.get("backend") != "ray":
                raise TransferError(f"handle from a {ep.get('backend')!r} holder given to the ray backend")
            if time.time() >= handle.lease_expires_at:
                raise TransferError(f"lease on {handle.request_id!r}'s blocks expired before the read")
            nbytes = len(dst_blocks) * dst.layout.bytes_per_block
            if len(dst_blocks) != len(handle.block_ids) or ep.get("nbytes") != nbytes:
                raise TransferError(f"ray payload of {handle.request_id!r} has {ep.get('nbytes')} bytes for "
                                    f"{len(handle.block_ids)} blocks; {len(dst_blocks)} destination blocks take {nbytes}")
            data = ray.get(ep["ref"], timeout=self.timeout_s)
            dst.write_blocks(dst_blocks, torch.from_numpy(data.copy()))  # object-store arrays are read-only
        except TransferError:
            self._count(failed=True)
            raise
        except Exception as e:  # lost owner, timeout, wrong size: never decode on partial KV
            self._count(failed=True)
            raise TransferError(f"ray object store read failed: {type(e).__name__}: {e}") from e
        self._count(nbytes=int(data.nbytes))

    def _count(self, nbytes: int = 0, failed: bool = False) -> None:
        with self._lock:
            self._stats["failures" if failed else "transfers"] += 1
            self._stats["bytes"] += nbytes

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats)
