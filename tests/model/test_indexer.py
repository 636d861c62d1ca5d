"""Lightning indexer: FP8 mode against the exact mode, ue8m0 quantization, Hadamard, top-k."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from workers.model.config import ModelConfig
from workers.model.indexer import Indexer, IndexKeys, hadamard, select_topk, ue8m0_quantize
from workers.model.rope import YarnRotary

CFG = ModelConfig(
    vocab_size=256, hidden_size=256, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=1,
    first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
    topk_group=1, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32,
    index_n_heads=16, index_head_dim=128, index_topk=64,
)


def _select(indexer: Indexer, x, qr, positions, topk):
    cos, sin = YarnRotary(CFG.qk_rope_head_dim, CFG.rope_theta, CFG.rope_scaling).cos_sin(positions, torch.float32)
    keys = indexer.keys(x, cos, sin)
    q, w = indexer.queries(x, qr, cos, sin)
    return select_topk(Indexer.scores(q, w, keys), positions, positions, topk)


@pytest.mark.parametrize("use_hadamard", [False, True], ids=["plain", "hadamard"])
def test_fp8_topk_overlaps_exact_topk(use_hadamard):
    torch.manual_seed(0)
    indexer = Indexer(CFG)
    for p in indexer.parameters():
        torch.nn.init.normal_(p, std=0.05) if p.dim() == 2 else None
    seq = 512
    x, qr = torch.randn(1, seq, CFG.hidden_size), torch.randn(1, seq, CFG.q_lora_rank)
    positions = torch.arange(seq)[None]
    exact_idx, valid = _select(indexer, x, qr, positions, CFG.index_topk)
    indexer.set_mode("fp8", hadamard=use_hadamard)
    fp8_idx, _ = _select(indexer, x, qr, positions, CFG.index_topk)
    overlaps = []
    for t in range(CFG.index_topk, seq):  # rows where selection is a real choice
        a = set(exact_idx[0, t][valid[0, t]].tolist())
        b = set(fp8_idx[0, t].tolist())
        overlaps.append(len(a & b) / len(a))
    mean = sum(overlaps) / len(overlaps)
    assert mean >= 0.90, f"FP8 top-k overlap {mean:.3f}"
    assert mean < 1.0  # FP8 really rounds: the comparison is not against itself


def test_ue8m0_scales_are_powers_of_two_and_bound_the_error():
    x = torch.randn(64, 128) * torch.logspace(-3, 3, 64)[:, None]
    x8, scale = ue8m0_quantize(x)
    assert x8.dtype == torch.float8_e4m3fn
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)
    deq = x8.float() * scale[:, None]
    assert (deq.abs().amax(dim=1) <= 448 * scale).all()
    # e4m3 keeps 3 mantissa bits: relative error ≤ 2^-4 for values in the normal range
    big = x.abs() > scale[:, None] * 2**-6 * 4
    assert ((deq - x).abs()[big] <= x.abs()[big] * 2**-4 + 1e-12).all()


def test_hadamard_is_orthonormal_and_preserves_scores():
    q, k = torch.randn(5, 128), torch.randn(7, 128)
    assert torch.allclose(hadamard(hadamard(q)), q, atol=1e-5)
    assert torch.allclose(hadamard(q) @ hadamard(k).T, q @ k.T, atol=1e-4)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(torch.randn(3, 96))


def test_topk_is_causal_and_selects_all_when_context_is_short():
    scores = torch.randn(1, 10, 10)
    pos = torch.arange(10)[None]
    idx, valid = select_topk(scores, pos, pos, 4)
    for t in range(10):
        chosen = idx[0, t][valid[0, t]].tolist()
        assert all(c <= t for c in chosen)
        assert len(chosen) == min(4, t + 1)
        if t >= 3:  # the 4 best visible scores
            assert set(chosen) == set(scores[0, t, : t + 1].topk(4).indices.tolist())


def test_topk_breaks_ties_by_earlier_position():
    scores = torch.zeros(1, 1, 12)  # every head's ReLU at zero: all tied
    idx, valid = select_topk(scores, torch.tensor([[11]]), torch.arange(12)[None], 5)
    assert idx[0, 0].tolist() == [0, 1, 2, 3, 4] and valid.all()


def test_ties_across_the_boundary_keep_the_earliest_positions():
    """Rows with many equal scores (ReLU zeros), some above: the set is every score above the k-th
    plus the earliest equal ones, exactly what a stable sort gives."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (3, 40, 300), generator=gen).float()  # heavy ties
    pos = torch.arange(300)[None].expand(3, 300)
    q_pos = torch.randint(20, 300, (3, 40), generator=gen)
    idx, valid = select_topk(scores, q_pos, pos, 16)
    masked = scores.masked_fill(pos[:, None, :] > q_pos[..., None], float("-inf"))
    ref = masked.sort(dim=-1, descending=True, stable=True).indices[..., :16]
    assert torch.equal(idx.sort(dim=-1).values, ref.sort(dim=-1).values)
    assert torch.equal(valid, torch.ones_like(valid))


def test_index_keys_dequantize():
    values, scale = ue8m0_quantize(torch.randn(2, 3, 128))
    keys = IndexKeys(values, scale)
    assert keys.dequantize().shape == (2, 3, 128)
    assert torch.allclose(keys.dequantize(), values.float() * scale[..., None])


def test_exact_mode_key_layout_matches_rope_first():
    """V3.2's fixed layout: the rope part is the first qk_rope_head_dim values of each indexer key."""
    cfg = dataclasses.replace(CFG, index_head_dim=128)
    idx = Indexer(cfg)
    x = torch.randn(1, 3, cfg.hidden_size)
    rot = YarnRotary(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
    k0 = idx.keys(x, *rot.cos_sin(torch.zeros(1, 3, dtype=torch.long), torch.float32)).values
    k5 = idx.keys(x, *rot.cos_sin(torch.full((1, 3), 5), torch.float32)).values
    assert torch.equal(k0[..., cfg.qk_rope_head_dim :], k5[..., cfg.qk_rope_head_dim :])
    assert not torch.allclose(k0[..., : cfg.qk_rope_head_dim], k5[..., : cfg.qk_rope_head_dim])


def test_slabbed_selection_equals_whole_selection(monkeypatch):
    import workers.model.indexer as indexer_mod

    torch.manual_seed(3)
    q, w = torch.randn(1, 150, 4, 16), torch.randn(1, 150, 4)
    keys = IndexKeys(torch.randn(1, 150, 16), torch.ones(1, 150))
    pos = torch.arange(150)[None]
    whole = select_topk(Indexer.scores(q, w, keys), pos, pos, 8)
    monkeypatch.setattr(indexer_mod, "_SCORE_BUDGET", 50 * 7)  # slabs of 7 query rows
    monkeypatch.setattr(indexer_mod, "_TILE_BUDGET", 7 * 4 * 64)  # ... scored in key tiles of 64
    slabbed = Indexer.select(q, w, keys, pos, pos, 8)
    assert torch.equal(whole[1].sum(-1), slabbed[1].sum(-1))  # as many valid picks per query
    for row in range(150):  # same sets (order within a row is free)
        assert set(whole[0][0, row][whole[1][0, row]].tolist()) == set(slabbed[0][0, row][slabbed[1][0, row]].tolist())
