"""Block hashing (fixed, versioned, salted) and the block pool (ref counts, prefix map, LRU)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvstore.block_pool import BlockPool
from kvstore.hashing import BLOCK_SIZE, block_hashes, self_test


def test_hashes_cover_full_blocks_only_and_chain():
    ids = list(range(BLOCK_SIZE * 3 + 10))
    hs = block_hashes(ids, model_id="m")
    assert len(hs) == 3 and len(set(hs)) == 3
    # a change in block 0 changes every later hash (chained); a change in the partial tail changes none
    changed = block_hashes([7] + ids[1:], model_id="m")
    assert all(a != b for a, b in zip(hs, changed))
    assert block_hashes(ids[:-1] + [999], model_id="m") == hs


def test_model_id_and_salt_separate_caches():
    ids = list(range(BLOCK_SIZE))
    base = block_hashes(ids, model_id="m")
    assert block_hashes(ids, model_id="other") != base
    assert block_hashes(ids, model_id="m", cache_salt="tenant-a") != base
    assert block_hashes(ids, model_id="m", cache_salt="") != base  # empty salt is still a salt


def test_hash_is_identical_across_processes():
    """No per-process seed: a fresh interpreter computes the same digest."""
    code = "from kvstore.hashing import block_hashes; print(block_hashes(list(range(128)), model_id='x')[1].hex())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == block_hashes(list(range(128)), model_id="x")[1].hex()
    self_test()


def test_pool_refcounts_prefix_hits_and_lru_eviction():
    events = []
    pool = BlockPool(4, on_event=lambda kind, h: events.append((kind, h)))
    a = pool.allocate(2)
    pool.commit(a[0], b"h0")
    pool.commit(a[1], b"h1")
    assert pool.lookup([b"h0", b"h1", b"h2"]) == a
    pool.acquire(a)  # a second holder
    pool.release(a)
    assert pool.num_free == 2
    pool.release(a)  # freed, still cached
    assert pool.num_free == 4 and pool.lookup([b"h0", b"h1"]) == a
    # 2 uncached blocks go first; then the LRU cached one: the tail block h1 (freed first)
    pool.allocate(3)
    assert pool.lookup([b"h0"]) == [a[0]] and pool.lookup([b"h1"]) == []
    assert ("removed", b"h1") in events and ("stored", b"h0") in events
    with pytest.raises(MemoryError):
        pool.allocate(2)


def test_pool_rejects_double_release_and_keeps_first_holder_of_a_hash():
    pool = BlockPool(3)
    x, y = pool.allocate(2)
    pool.commit(x, b"same")
    pool.commit(y, b"same")  # same content computed twice: the first stays findable
    assert pool.lookup([b"same"]) == [x]
    pool.release([x])
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([x])
