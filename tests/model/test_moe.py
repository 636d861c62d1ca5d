"""The noaux_tc gate against a brute-force implementation, and the MoE sum."""

from __future__ import annotations

import itertools

import torch

from workers.model.config import ModelConfig
from workers.model.moe import Gate, MoE

CFG = ModelConfig(
    vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
    first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5, q_lora_rank=16,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, index_n_heads=2,
    index_head_dim=16, index_topk=8,
)


def brute_force_gate(x, weight, bias, cfg):
    per_group = cfg.n_routed_experts // cfg.n_group
    out = []
    for row in x:
        s = torch.sigmoid(weight.float() @ row.float())
        b = s + bias
        group_score = [sorted(b[g * per_group : (g + 1) * per_group].tolist())[-2:] for g in range(cfg.n_group)]
        group_score = [sum(v) for v in group_score]
        best = max(itertools.combinations(range(cfg.n_group), cfg.topk_group), key=lambda gs: sum(group_score[g] for g in gs))
        allowed = [e for g in best for e in range(g * per_group, (g + 1) * per_group)]
        chosen = sorted(allowed, key=lambda e: -b[e].item())[: cfg.num_experts_per_tok]
        w = torch.stack([s[e] for e in chosen])
        w = w / w.sum() * cfg.routed_scaling_factor
        out.append(dict(zip(chosen, w.tolist())))
    return out


def test_gate_equals_brute_force():
    torch.manual_seed(0)
    gate = Gate(CFG)
    torch.nn.init.normal_(gate.weight, std=0.3)
    with torch.no_grad():
        gate.bias.normal_(0, 0.5)  # large enough to change selections vs. the raw scores
    x = torch.randn(64, CFG.hidden_size)
    weights, ids = gate(x)
    expected = brute_force_gate(x, gate.weight, gate.bias, CFG)
    for row, want in enumerate(expected):
        got = dict(zip(ids[row].tolist(), weights[row].tolist()))
        assert got.keys() == want.keys()
        for e in want:
            assert abs(got[e] - want[e]) < 1e-5
    # the bias steers selection only: weights sum to the scaling factor
    assert torch.allclose(weights.sum(-1), torch.full((64,), 2.5), atol=1e-5)


def test_bias_changes_selection_not_weights():
    torch.manual_seed(1)
    gate = Gate(CFG)
    torch.nn.init.normal_(gate.weight, std=0.3)
    x = torch.randn(32, CFG.hidden_size)
    _, ids_plain = gate(x)
    with torch.no_grad():
        gate.bias[:] = -10.0
        gate.bias[:4] = 10.0  # group 0 always wins and its experts are chosen
    w, ids = gate(x)
    assert not torch.equal(ids_plain, ids)
    assert (ids < 4).all()
    s = torch.sigmoid(x @ gate.weight.T)
    ref = s.gather(1, ids)
    assert torch.allclose(w, ref / ref.sum(-1, keepdim=True) * 2.5, atol=1e-5)


def test_moe_is_weighted_sum_of_experts_plus_shared():
    torch.manual_seed(2)
    moe = MoE(CFG)
    for p in moe.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 5, CFG.hidden_size)
    out = moe(x)
    flat = x.reshape(-1, CFG.hidden_size)
    w, ids = moe.gate(flat)
    ref = moe.shared_experts(flat).clone()
    for n in range(flat.shape[0]):
        for j in range(ids.shape[1]):
            ref[n] += w[n, j] * moe.experts[int(ids[n, j])](flat[n])
    assert torch.allclose(out.reshape(-1, CFG.hidden_size), ref, atol=1e-5)
