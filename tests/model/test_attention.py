"""Sparse gather attention against the dense-mask reference; YaRN RoPE against transformers."""

from __future__ import annotations

import pytest
import torch

from workers.model.config import ModelConfig, RopeScaling
from workers.model.cache import gather_rows
from workers.model.mla import MLA
from workers.model.rope import YarnRotary, apply_interleaved, apply_neox

CFG = ModelConfig(
    vocab_size=256, hidden_size=64, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
    first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
    topk_group=1, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    index_n_heads=4, index_head_dim=16, index_topk=8,
)


def test_sparse_gather_equals_dense_mask_reference():
    torch.manual_seed(0)
    mla = MLA(CFG)
    torch.nn.init.normal_(mla.wkv_b.weight, std=0.2)
    b, s, t, k = 2, 5, 40, 8
    q_nope = torch.randn(b, s, CFG.num_attention_heads, CFG.qk_nope_head_dim)
    q_pe = torch.randn(b, s, CFG.num_attention_heads, CFG.qk_rope_head_dim)
    latent = torch.randn(b, t, CFG.latent_dim)
    idx = torch.stack([torch.randperm(t)[:k] for _ in range(b * s)]).view(b, s, k)
    valid = torch.rand(b, s, k) > 0.3
    valid[..., 0] = True  # every query attends to something
    gather = lambda sel: gather_rows(latent, sel)
    sparse = mla.attend_sparse(q_nope, q_pe, gather, idx, valid)
    dense = mla.attend_dense(q_nope, q_pe, latent, idx, valid)
    assert torch.allclose(sparse, dense, atol=1e-5)
    # and the selection matters: a different valid set gives a different result
    other = mla.attend_sparse(q_nope, q_pe, gather, idx, torch.ones_like(valid))
    assert not torch.allclose(sparse, other, atol=1e-3)


def test_sparse_gather_memory_is_bounded_by_k_not_t(monkeypatch):
    """The gathered slab is [B, chunk, K, C]; with a tiny budget the loop still gives the same answer."""
    import workers.model.mla as mla_mod

    torch.manual_seed(1)
    mla = MLA(CFG)
    b, s, t, k = 1, 9, 64, 8
    latent = torch.randn(b, t, CFG.latent_dim)
    seen = []

    def gather(sel):
        seen.append(sel.shape[1])
        return gather_rows(latent, sel)

    args = (torch.randn(b, s, 4, 16), torch.randn(b, s, 4, 8), gather, torch.randint(0, t, (b, s, k)), torch.ones(b, s, k, dtype=torch.bool))
    whole = mla.attend_sparse(*args)
    assert seen == [s]
    seen.clear()
    monkeypatch.setattr(mla_mod, "_GATHER_BUDGET", k * CFG.latent_dim * 2)  # two queries per slab
    assert torch.allclose(mla.attend_sparse(*args), whole, atol=1e-6)
    assert seen == [2, 2, 2, 2, 1]  # only K latents per query are ever materialized


@pytest.mark.parametrize(
    "scaling",
    [None, RopeScaling(factor=40.0, original_max_position_embeddings=4096), RopeScaling(factor=4.0, original_max_position_embeddings=64, mscale=0.7, mscale_all_dim=1.0)],
    ids=["plain", "yarn-671b", "yarn-mscale"],
)
def test_yarn_frequencies_match_transformers(scaling):
    from transformers import DeepseekV32Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "default", "rope_theta": 10000.0}
    if scaling is not None:
        params = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": scaling.factor,
                  "original_max_position_embeddings": scaling.original_max_position_embeddings,
                  "beta_fast": 32, "beta_slow": 1, "mscale": scaling.mscale, "mscale_all_dim": scaling.mscale_all_dim}
    hc = DeepseekV32Config(qk_rope_head_dim=64, rope_parameters=params, max_position_embeddings=163840)
    rot = YarnRotary(64, 10000.0, scaling)
    if scaling is None:
        ref = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64))
        factor = 1.0
    else:
        ref, factor = ROPE_INIT_FUNCTIONS["yarn"](hc)
    assert torch.allclose(rot.inv_freq, ref, rtol=1e-6)
    assert abs(rot.attention_factor - factor) < 1e-7


def test_softmax_scale_of_671b():
    assert abs(ModelConfig().softmax_scale - 0.1352338) < 1e-6


def test_rope_layouts():
    """Interleaved rotates (x0,x1) pairs, NeoX rotates (x_i, x_{i+d/2}); both preserve norms."""
    x = torch.randn(1, 1, 8)
    cos, sin = torch.zeros(1, 1, 4), torch.ones(1, 1, 4)  # a 90° turn
    assert torch.allclose(apply_interleaved(x, cos, sin)[..., :2], torch.stack((-x[..., 1], x[..., 0]), -1))
    assert torch.allclose(apply_neox(x, cos, sin)[..., 0], -x[..., 4])
    angles = YarnRotary(8, 10000.0, None).cos_sin(torch.tensor([[3]]), torch.float32)
    for f in (apply_interleaved, apply_neox):
        assert torch.allclose(f(x, *angles).norm(), x.norm(), atol=1e-6)
