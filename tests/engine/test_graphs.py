"""Decode steps run as static-shape steps (``DecodeGraphs``, what a CUDA graph replays) equal the eager
step path: padded to a batch bucket (rows repeating row 0), block tables widened to a context bucket,
lengths read from a tensor. On the CPU the same padded step runs uncaptured (``capture=False``): these
tests check the padding and masking; capture itself needs CUDA (``tests/gpu``)."""

from __future__ import annotations

import pytest
import torch

from tests.model.test_step import BS, Seqs, _model
from workers.engine.graphs import DecodeGraphs, batch_buckets, context_buckets, prepare_fused
from workers.model.moe import MoE
from workers.model.step import StepBatch


def test_buckets():
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_buckets(1) == (1,)
    assert context_buckets(2048) == (4, 16, 64, 256, 1024, 2048)
    assert context_buckets(3) == (3,)


def _decode_both_ways(seqs: Seqs, graphs: DecodeGraphs, members: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode token of each member: eager ``StepBatch`` step, then the static step → logits of both."""
    model = seqs.model
    ids = [int(seqs.ids[s][seqs.done[s]]) for s in members]
    lens = [seqs.done[s] + 1 for s in members]
    tables = [seqs.tables[s] for s in members]
    with torch.inference_mode():
        batch = StepBatch.build(tables, [1] * len(members), lens, len(members), BS)
        eager = model.head_logits(model.hidden_step(torch.tensor(ids), seqs.storage, batch), float32=False)
        static = graphs.run(ids, tables, lens)
    for s in members:
        seqs.done[s] += 1
    return eager, static


def _prefilled(topk: int, lengths: list[int], seed: int = 0) -> Seqs:
    seqs = Seqs(_model(topk, seed=seed), lengths)
    for s, n in enumerate(lengths):
        seqs.step([(s, n - 3)], 0)  # leave three tokens of each prompt to decode
    return seqs


@pytest.mark.parametrize("topk", [64, 8], ids=["dense-decode", "sparse-decode"])
def test_padded_static_decode_equals_the_eager_step(topk):
    """Three sequences (contexts below and above top-k) run as a batch of 4 over a 16-block table; then one
    alone (bucket 1) and two (bucket 2)."""
    seqs = _prefilled(topk, [20, 45, 90])
    graphs = DecodeGraphs(seqs.model, seqs.storage, max_batch=8, max_blocks=16, capture=False)
    for members in ([0, 1, 2], [2], [0, 1]):
        eager, static = _decode_both_ways(seqs, graphs, members)
        assert static.shape == eager.shape
        torch.testing.assert_close(static, eager, rtol=1e-4, atol=1e-4)
        assert torch.equal(static.argmax(-1), eager.argmax(-1))


def test_steps_past_the_limits_are_refused():
    seqs = _prefilled(8, [20, 45])
    graphs = DecodeGraphs(seqs.model, seqs.storage, max_batch=1, max_blocks=2, capture=False)
    assert not graphs.fits(2, [18, 43]) and not graphs.fits(1, [33]) and graphs.fits(1, [32])
    with pytest.raises(ValueError, match="past the captured limits"):
        graphs.run([1], [seqs.tables[1]], [43])


def test_cpu_models_stay_eager():
    model = _model(8)
    assert prepare_fused(model) == "needs CUDA tensors and triton"
    assert all(m.stacked is None for m in model.modules() if isinstance(m, MoE))
