"""Small random DeepSeek-V3.2 models built with transformers (the oracle) and saved in HF layout."""

from __future__ import annotations

from pathlib import Path

import torch

YARN = {
    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
}
PLAIN = {"rope_type": "default", "rope_theta": 10000.0}


def hf_config(*, yarn: bool = True, **overrides):
    from transformers import DeepseekV32Config

    args = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        index_n_heads=8, index_head_dim=16, index_topk=8, max_position_embeddings=256,
        rope_parameters=dict(YARN if yarn else PLAIN),
    )
    args.update(overrides)
    return DeepseekV32Config(**args)


def hf_model(seed: int = 0, *, std: float = 0.1, **config_overrides):
    """A transformers DeepseekV32ForCausalLM with random weights large enough to make routing and
    top-k selection matter (std 0.1 instead of the 0.02 init)."""
    from transformers import DeepseekV32ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV32ForCausalLM(hf_config(**config_overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0.0, 0.1)
    return model


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
