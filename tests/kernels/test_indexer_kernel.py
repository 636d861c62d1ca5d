"""Indexer logits over paged keys (Triton, interpreted) against the model's PyTorch scoring."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.paged import block_tables, fp8_round, index_cache, on
from workers.kernels.indexer import (
    paged_index_logits, paged_index_logits_reference, paged_index_topk, paged_index_topk_reference,
)
from workers.model.indexer import Indexer, IndexKeys

BS, NB = 8, 24


def _case(seed: int, heads: int, dim: int, fp8: bool, lengths: list[int]):
    gen = torch.Generator().manual_seed(seed)
    table = block_tables(gen, lengths, BS, NB)
    k, scale = index_cache(gen, NB, BS, dim, fp8)
    return gen, table, k, scale


def _check_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8-keys", "float-keys"])
@pytest.mark.parametrize("heads,dim", [(4, 32), (3, 16)])
def test_decode_logits_and_topk_match_reference(fp8, heads, dim, device):
    lengths = [37, 64, 5]
    gen, table, k, scale = _case(0, heads, dim, fp8, lengths)
    q = torch.randn(3, heads, dim, generator=gen)
    q = fp8_round(q) if fp8 else q
    w = torch.randn(3, heads, generator=gen)
    seq = torch.arange(3)
    q_pos = torch.tensor(lengths) - 1
    t = -(-max(lengths) // BS) * BS
    args = on(device, q, w, k, scale, table, seq, q_pos, t)
    _check_logits(paged_index_logits(*args), paged_index_logits_reference(*args))
    idx, valid = paged_index_topk(*args, 16)
    ridx, rvalid = paged_index_topk_reference(*args, 16)
    idx, valid, ridx, rvalid = (t.cpu() for t in (idx, valid, ridx, rvalid))
    for r in range(3):
        assert set(idx[r][valid[r]].tolist()) == set(ridx[r][rvalid[r]].tolist())
    assert valid.sum(1).tolist() == [16, 16, 5]


def test_causal_prefill_chunk_selects_as_indexer_select(device):
    """A chunk of 20 queries at positions 30..49 of one sequence: same selection as ``Indexer.select``
    on the sequence's keys read contiguously (the engine's PyTorch path)."""
    heads, dim, length, n, topk = 4, 32, 50, 20, 12
    gen, table, k, scale = _case(1, heads, dim, True, [length])
    q = fp8_round(torch.randn(n, heads, dim, generator=gen))
    w = torch.randn(n, heads, generator=gen)
    q_pos = torch.arange(length - n, length)
    args = on(device, q, w, k, scale, table, torch.zeros(n, dtype=torch.long), q_pos, length)
    logits = paged_index_logits(*args)
    _check_logits(logits, paged_index_logits_reference(*args))
    logits = logits.cpu()
    assert torch.isinf(logits[0, 31:]).all() and torch.isfinite(logits[0, :31]).all()
    idx, valid = (t.cpu() for t in paged_index_topk(*args, topk))
    keys = IndexKeys(k[table[0]].flatten(0, 1)[None, :length], scale[table[0]].flatten(0, 1)[None, :length])
    ridx, rvalid = Indexer.select(q[None], w[None], keys, q_pos[None], torch.arange(length)[None], topk)
    assert valid.all() and rvalid.all()
    assert torch.equal(idx.sort(dim=1).values, ridx[0].sort(dim=1).values)


def test_rows_of_several_sequences_in_one_launch(device):
    """Rows may mix sequences and positions (a decode batch beside prefill rows): each reads its own table."""
    heads, dim = 2, 16
    lengths = [9, 30]
    gen, table, k, scale = _case(2, heads, dim, False, lengths)
    seq = torch.tensor([1, 0, 1, 1])
    q_pos = torch.tensor([29, 8, 3, 17])
    q, w = torch.randn(4, heads, dim, generator=gen), torch.randn(4, heads, generator=gen)
    args = on(device, q, w, k, scale, table, seq, q_pos, 32)
    _check_logits(paged_index_logits(*args), paged_index_logits_reference(*args))


def test_sync_free_topk_selects_the_reference_set_under_ties():
    """``topk_earliest`` (the CUDA-graph-safe selection) picks the set ``Indexer``'s tie rule picks: scores
    with many exact ties (zeros of both signs, as ReLU-weighted sums give), negatives and -inf."""
    from workers.kernels.indexer import topk_earliest
    from workers.model.indexer import _topk_earliest_on_ties

    gen = torch.Generator().manual_seed(3)
    logits = torch.randint(-3, 4, (64, 200), generator=gen).float() / 4
    logits[logits == 0] = torch.where(torch.rand(int((logits == 0).sum()), generator=gen) < 0.5, -0.0, 0.0)
    logits[:, 150:] = float("-inf")  # past the rows' positions
    logits[5] = 0.0
    for k in (1, 16, 149, 150, 170, 200, 300):
        got = topk_earliest(logits, k).sort(dim=1).values
        want = _topk_earliest_on_ties(logits[None], k)[0].sort(dim=1).values
        assert got.shape == want.shape == (64, min(k, 200))
        # Entries past the visible keys (-inf) are invalid whichever are picked: compare the visible ones.
        assert torch.equal(got.masked_fill(got >= 150, -1), want.masked_fill(want >= 150, -1)), k
