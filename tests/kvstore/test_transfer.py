"""KV transfer refuses what may be another request's KV: a handle past its lease, blocks the holder
freed or reused since the hand-off (before or during the copy). A refused read raises TransferError,
counts a failure and leaves the destination blocks untouched."""

from __future__ import annotations

import time

import pytest
import torch

from kvstore.block_pool import BlockPool
from kvstore.handle import KVHandle, LayoutFingerprint
from kvstore.paged import BlockLayout, PagedKVStorage
from kvstore.transfer import LocalTransfer, TransferError

LAYOUT = BlockLayout(num_layers=2, block_size=16, latent_dim=8, latent_dtype=torch.float32, index_dim=4,
                     index_dtype=torch.float32)
FP = LayoutFingerprint("m", "float32", "exact", 16, 1, 2, LAYOUT.bytes_per_block)


class Holder:
    """A holder's storage and pool behind a LocalTransfer, with two blocks handed off."""

    def __init__(self) -> None:
        self.transfer = LocalTransfer()
        self.storage = PagedKVStorage(LAYOUT, 4)
        self.storage.buffer.copy_(torch.randint(0, 256, self.storage.buffer.shape, dtype=torch.uint8,
                                                generator=torch.Generator().manual_seed(0)))
        self.pool = BlockPool(4)
        self.transfer.holder("prefill-0", self.storage).bind_pool(self.pool)
        self.blocks = self.pool.allocate(2)

    def handle(self, lease_s: float = 30.0, **changes) -> KVHandle:
        fields = dict(worker_id="prefill-0", request_id="r", block_ids=tuple(self.blocks), num_tokens=20, first_token=1,
                      fingerprint=FP, lease_expires_at=time.time() + lease_s,
                      block_generations=self.pool.generations(self.blocks))
        return KVHandle(**{**fields, **changes})


def _refused(holder: Holder, handle: KVHandle, match: str) -> None:
    dst = PagedKVStorage(LAYOUT, 2)
    with pytest.raises(TransferError, match=match):
        holder.transfer.read(handle, dst, [0, 1])
    assert not dst.buffer.any()
    assert holder.transfer.stats()["failures"] == 1 and holder.transfer.stats()["transfers"] == 0


def test_a_held_handle_reads_its_blocks():
    h = Holder()
    dst = PagedKVStorage(LAYOUT, 2)
    h.transfer.read(h.handle(), dst, [1, 0])
    assert torch.equal(dst.read_blocks([1, 0]), h.storage.read_blocks(h.blocks))


def test_an_expired_lease_is_refused():
    h = Holder()
    _refused(h, h.handle(lease_s=-0.001), "lease .* expired before the read")


def test_freed_blocks_are_refused_even_before_they_are_overwritten():
    h = Holder()
    handle = h.handle()
    h.pool.release(h.blocks)  # the lease ended early (released, or the holder restarted)
    _refused(h, handle, "freed or reused by the holder before the read")


def test_reused_blocks_are_refused():
    h = Holder()
    handle = h.handle()
    h.pool.release(h.blocks)
    assert sorted(h.pool.allocate(4)) == [0, 1, 2, 3]  # another request took every block
    _refused(h, handle, "freed or reused")


def test_blocks_reused_during_the_copy_are_discarded():
    h = Holder()
    handle = h.handle()
    real = h.storage.read_blocks

    def racing(ids):
        data = real(ids)
        h.pool.release(h.blocks)  # the holder's thread frees and reuses them meanwhile
        h.pool.allocate(4)
        return data

    h.storage.read_blocks = racing
    _refused(h, handle, "freed or reused by the holder during the read")


def test_a_handle_without_generations_is_refused_by_a_holder_that_tracks_them():
    h = Holder()
    _refused(h, h.handle(block_generations=()), "carries no block generations")


def test_generations_grow_on_free_allocate_and_reset():
    pool = BlockPool(2)
    a = pool.allocate(1)
    g = pool.generations(a)
    pool.acquire(a)
    pool.release(a)
    assert pool.generations(a) == g  # still in use: unchanged
    pool.release(a)
    assert pool.generations(a)[0] > g[0]
    freed = pool.generations(a)
    pool.allocate(2)
    assert pool.generations(a)[0] > freed[0]
    before = pool.generations([0, 1])
    pool.reset()
    assert all(x > y for x, y in zip(pool.generations([0, 1]), before))
    assert pool.num_free == 2 and pool.ref_count == [0, 0]


def test_ray_reader_refuses_an_expired_lease_and_a_payload_of_the_wrong_size():
    pytest.importorskip("ray")
    from cluster.ray_transfer import RayTransfer

    h = Holder()
    reader, dst = RayTransfer(timeout_s=1.0), PagedKVStorage(LAYOUT, 2)
    expired = h.handle(lease_s=-0.001, endpoint={"backend": "ray", "ref": None, "nbytes": 2 * LAYOUT.bytes_per_block})
    with pytest.raises(TransferError, match="lease .* expired before the read"):
        reader.read(expired, dst, [0, 1])
    short = h.handle(endpoint={"backend": "ray", "ref": None, "nbytes": LAYOUT.bytes_per_block})
    with pytest.raises(TransferError, match="payload .* has"):
        reader.read(short, dst, [0, 1])
    assert reader.stats()["failures"] == 2 and not dst.buffer.any()
