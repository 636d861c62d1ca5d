"""bench/long_context's analytic indexer count and its timing wrappers (the benchmark itself is long)."""

from __future__ import annotations

import torch

from bench.long_context import IndexerTimer, indexer_flops, indexer_pairs
from workers.model.indexer import Indexer, IndexKeys
from workers.model.presets import PRESETS


def test_pairs_are_causal_and_skip_dense_chunks():
    assert indexer_pairs(2048, 4096, 2048) == 0  # context ≤ top-k: dense attention, no indexer
    assert indexer_pairs(8192, 4096, 2048) == 8192 * 8193 // 2
    # Chunks of 1024 under top-k 2048: the first two chunks (contexts 1024, 2048) are dense.
    assert indexer_pairs(4096, 1024, 2048) == sum(t + 1 for t in range(2048, 4096))


def test_128k_indexer_is_about_7_tflop():
    flops = indexer_flops(PRESETS["tiny-128k"], 131000, 4096)
    assert 6.5e12 < flops < 7e12  # the "~7 TFLOP"


def test_timer_counts_calls_and_restores_the_class():
    before = {name: Indexer.__dict__[name] for name in IndexerTimer.NAMES}
    timer = IndexerTimer().install()
    try:
        q, w = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2)
        keys = IndexKeys(torch.randn(1, 5, 4), torch.ones(1, 5))
        idx, valid = Indexer.select(q, w, keys, torch.tensor([[2, 3, 4]]), torch.arange(5)[None], 2)
        assert idx.shape == valid.shape == (1, 3, 2)
        assert timer.calls["select"] == 1 and timer.seconds["select"] > 0
    finally:
        timer.uninstall()
    assert {name: Indexer.__dict__[name] for name in IndexerTimer.NAMES} == before
