"""Fused routed experts (Triton, interpreted) against ``MoE.routed``, plus the expert alignment and stacking."""

from __future__ import annotations

import pytest
import torch

from workers.kernels.moe import StackedExperts, align_by_expert, fused_moe, padded_slots, stack_experts
from workers.model.config import ModelConfig
from workers.model.fp8 import FP8Linear, quantize_weight
from workers.model.moe import AbsentExpert, MoE

D, I = 48, 40  # not multiples of the tile sizes (16 interpreted, 64/128 on CUDA)


def _moe(experts: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> MoE:
    cfg = ModelConfig(
        vocab_size=256, hidden_size=D, intermediate_size=64, moe_intermediate_size=I, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=experts, n_shared_experts=0,
        num_experts_per_tok=k, n_group=1, topk_group=1, routed_scaling_factor=2.5, q_lora_rank=16,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
        index_head_dim=16, index_topk=8,
    )
    torch.manual_seed(seed)
    moe = MoE(cfg)
    for p in moe.experts.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return moe.to(dtype)


def _quantize_experts(moe: MoE, block: tuple[int, int]) -> MoE:
    for expert in moe.experts:
        for name in ("w1", "w2", "w3"):
            w8, scale = quantize_weight(getattr(expert, name).weight.detach(), block)
            setattr(expert, name, FP8Linear.from_weight(w8, scale, block))
    return moe


def _routing(n: int, k: int, experts: int, seed: int, unused: int | None = None):
    """Distinct experts per token (``unused`` never chosen) and positive weights."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, experts, generator=gen)
    if unused is not None:
        scores[:, unused] = -1.0
    ids = scores.topk(k, dim=1).indices
    weights = torch.rand(n, k, generator=gen) + 0.1
    return weights, ids


@pytest.mark.parametrize("n,k,experts,block_m", [(7, 3, 8, 4), (1, 2, 16, 16), (33, 4, 16, 16)])
def test_align_by_expert(n, k, experts, block_m, device):
    _, ids = _routing(n, k, experts, seed=n, unused=experts - 1)
    ids = ids.to(device)
    slots, block_expert = align_by_expert(ids, experts, block_m)
    m = n * k
    p = padded_slots(m, experts, block_m)
    assert p == -(-(m + min(experts, m) * (block_m - 1)) // block_m) * block_m
    assert slots.shape == (p,) and block_expert.shape == (p // block_m,)
    slots, block_expert, flat = slots.cpu(), block_expert.cpu(), ids.flatten().cpu()

    real = slots[slots < m]
    assert torch.equal(real.sort().values, torch.arange(m))  # every slot exactly once
    assert (slots[slots >= m] == m).all()  # padding is the sentinel
    owner = block_expert.repeat_interleave(block_m)
    assert torch.equal(flat[real], owner[slots < m])  # a slot sits in a block of its expert
    counts = torch.bincount(flat, minlength=experts)
    assert counts[experts - 1] == 0
    blocks = torch.bincount(block_expert[block_expert >= 0], minlength=experts)
    assert torch.equal(blocks, (counts + block_m - 1) // block_m)
    used = int(blocks.sum())
    assert (block_expert[used:] == -1).all() and (block_expert[:used] >= 0).all()
    assert torch.equal(block_expert[:used], block_expert[:used].sort().values)  # experts in order
    for e in range(experts):  # each expert's slots in ascending order, its run starting on a block
        run = slots[owner == e]
        assert torch.equal(run[: counts[e]], run[: counts[e]].sort().values)


@pytest.mark.parametrize("n,k,experts", [(1, 2, 8), (5, 3, 16), (33, 4, 16)])
def test_fused_matches_routed_float32(n, k, experts, device):
    moe = _moe(experts, k, seed=n).to(device)
    stack = stack_experts(moe)
    assert isinstance(stack, StackedExperts) and not stack.fp8
    weights, ids = _routing(n, k, experts, seed=n, unused=0)
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(n))
    x, weights, ids = x.to(device), weights.to(device), ids.to(device)
    with torch.no_grad():
        want = moe.routed(x, weights, ids)
    got = fused_moe(x, weights, ids, stack)
    assert got.shape == (n, D) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_fused_matches_routed_bfloat16(device):
    n, k, experts = 9, 2, 8
    moe = _moe(experts, k, seed=3, dtype=torch.bfloat16).to(device)
    stack = stack_experts(moe)
    weights, ids = _routing(n, k, experts, seed=3)
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(3)).to(device, torch.bfloat16)
    weights, ids = weights.to(device), ids.to(device)
    with torch.no_grad():
        want = moe.routed(x, weights, ids)
    got = fused_moe(x, weights, ids, stack)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize(
    "n,k,experts,block",
    [(33, 3, 8, (16, 16)), (5, 2, 8, (8, 24)), (5, 4, 8, (128, 128))],
    ids=["per-tile-scale", "per-element-scale", "one-block"],
)
def test_fused_matches_routed_fp8(n, k, experts, block, device):
    """FP8 experts: the kernel scales each K tile's partial product per column when the tile lies in one
    scale block (16 | bi), and each weight element otherwise (bi = 24)."""
    moe = _quantize_experts(_moe(experts, k, seed=n + 100), block).to(device)
    stack = stack_experts(moe)
    assert stack.fp8 and stack.block == block and stack.w1.dtype == torch.float8_e4m3fn
    assert stack.w2_scale.shape == (experts, -(-D // block[0]), -(-I // block[1]))
    weights, ids = _routing(n, k, experts, seed=n)
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(n))
    x, weights, ids = x.to(device), weights.to(device), ids.to(device)
    with torch.no_grad():
        want = moe.routed(x, weights, ids)  # dequantizes per call
    got = fused_moe(x, weights, ids, stack)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("fp8", [False, True], ids=["float", "fp8"])
def test_stack_experts_shares_storage_and_keeps_reference(fp8, device):
    n, k, experts = 6, 2, 8
    moe = _moe(experts, k, seed=7)
    if fp8:
        _quantize_experts(moe, (16, 16))
    moe = moe.to(device)
    weights, ids = _routing(n, k, experts, seed=7)
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(7))
    x, weights, ids = x.to(device), weights.to(device), ids.to(device)
    with torch.no_grad():
        before = moe.routed(x, weights, ids)
        stack = stack_experts(moe)
        after = moe.routed(x, weights, ids)
    assert torch.equal(before, after)

    def inside(t: torch.Tensor, whole: torch.Tensor) -> bool:
        start = whole.data_ptr()
        return start <= t.data_ptr() and t.data_ptr() + t.nbytes <= start + whole.nbytes

    for e, expert in enumerate(moe.experts):
        for name in ("w1", "w2", "w3"):
            layer, whole = getattr(expert, name), getattr(stack, name)
            raw = layer.weight.view(torch.uint8) if fp8 else layer.weight  # fp8 has no equal on CPU
            assert inside(layer.weight, whole) and torch.equal(raw, whole[e].view(raw.dtype))
            if fp8:
                scale = getattr(stack, f"{name}_scale")
                assert inside(layer.weight_scale_inv, scale) and torch.equal(layer.weight_scale_inv, scale[e])
    again = stack_experts(moe)  # finds the views: the same storage, no copy
    assert again.w1.data_ptr() == stack.w1.data_ptr() and again.w2.data_ptr() == stack.w2.data_ptr()
    with torch.no_grad():
        assert torch.equal(moe.routed(x, weights, ids), before)


def test_stack_experts_declines_absent_and_mixed_experts():
    moe = _moe(8, 2)
    moe.experts[3] = AbsentExpert(1, 3)
    assert stack_experts(moe) is None
    mixed = _moe(8, 2)
    _quantize_experts(mixed, (16, 16))
    plain = _moe(8, 2)
    mixed.experts[5] = plain.experts[5]
    ptr = mixed.experts[0].w1.weight.data_ptr()
    assert stack_experts(mixed) is None
    assert mixed.experts[0].w1.weight.data_ptr() == ptr  # nothing replaced


def test_no_tokens(device):
    moe = _moe(8, 2).to(device)
    stack = stack_experts(moe)
    x = torch.empty(0, D, device=device)
    weights = torch.empty(0, 2, device=device)
    ids = torch.empty(0, 2, dtype=torch.long, device=device)
    out = fused_moe(x, weights, ids, stack)
    assert out.shape == (0, D) and out.dtype == x.dtype
    slots, block_expert = align_by_expert(ids, 8, 16)
    assert slots.numel() == 0 and block_expert.numel() == 0
