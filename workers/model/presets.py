"""Named model sizes for random checkpoints (``dsaserve model init --preset``).

All keep the real vocabulary (129280, the V3 tokenizer) and every structural feature of the 671B
release — dense then MoE layers, grouped routing, MLA with a q LoRA, the DSA indexer, YaRN, one MTP layer
— at sizes that run on a CPU. ``tiny`` is the embedded default model of tests and demos.

``tiny-128k`` is ``tiny``'s widths with V3.2's long-context settings: ``index_topk`` 2048,
``max_position_embeddings`` 163840 and V3.2's YaRN (factor 40 over 4096 original positions), so a
131,072-token prompt is a valid request (``bench/long_context.py``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from workers.model.config import ConfigError, ModelConfig, RopeScaling

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=129280,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=64,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        index_n_heads=4,
        index_head_dim=32,
        index_topk=32,
        max_position_embeddings=32768,
        rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=4096),
        num_nextn_predict_layers=1,
    ),
    "small": ModelConfig(
        vocab_size=129280,
        hidden_size=512,
        intermediate_size=1536,
        moe_intermediate_size=256,
        num_hidden_layers=8,
        first_k_dense_replace=1,
        num_attention_heads=8,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        q_lora_rank=256,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        index_n_heads=8,
        index_head_dim=64,
        index_topk=256,
        max_position_embeddings=32768,
        rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=4096),
        num_nextn_predict_layers=1,
    ),
}


# V3.2's rope_scaling (config.json): YaRN factor 40 over 4096 original positions → 163840.
V32_ROPE_SCALING = RopeScaling(
    factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
)

PRESETS["tiny-128k"] = replace(
    PRESETS["tiny"], index_topk=2048, max_position_embeddings=163840, rope_scaling=V32_ROPE_SCALING,
)


def load_preset(name_or_path: str | Path) -> ModelConfig:
    """A preset by name (``"tiny"``, ``"small"``, ``"tiny-128k"``) or a HF ``config.json`` file (any ``*.json`` path).

    Raises:
        ConfigError: unknown preset (the message lists the presets), or an invalid/missing JSON file.
    """
    text = str(name_or_path)
    if text.endswith(".json") or Path(text).is_file():
        return ModelConfig.from_hf(Path(text))
    if text in PRESETS:
        return PRESETS[text]
    raise ConfigError(f"unknown preset {text!r}: choose one of {', '.join(sorted(PRESETS))} or a FILE.json")
