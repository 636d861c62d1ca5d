"""ModelConfig reads DeepSeek's config.json and names the key in every error."""

from __future__ import annotations

import json

import pytest

from workers.model.config import ConfigError, ModelConfig

HF_671B = {
    "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "first_k_dense_replace": 3, "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048, "max_position_embeddings": 163840,
    "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
    "num_nextn_predict_layers": 1, "torch_dtype": "bfloat16", "use_cache": True,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
    "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
}


def test_reads_the_671b_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_671B))
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg.hidden_size == 7168 and cfg.index_topk == 2048 and cfg.latent_dim == 576
    assert cfg.rope_scaling.factor == 40 and cfg.quantization_config.weight_block_size == (128, 128)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_reference_repo_names_are_accepted():
    cfg = ModelConfig.from_hf({"dim": 1024, "n_layers": 4, "n_dense_layers": 1, "route_scale": 1.5})
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.first_k_dense_replace, cfg.routed_scaling_factor) == (1024, 4, 1, 1.5)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("n_group", 7, "'n_group': must divide n_routed_experts"),
        ("topk_group", 9, "'topk_group'"),
        ("hidden_size", 0, "'hidden_size': must be a positive integer"),
        ("hidden_size", "big", "'hidden_size'"),
        ("scoring_func", "softmax", "'scoring_func'"),
        ("index_head_dim", 32, "'index_head_dim': must exceed qk_rope_head_dim"),
        ("first_k_dense_replace", 99, "'first_k_dense_replace'"),
        ("rope_scaling", {"type": "linear", "factor": 2}, "'rope_scaling.type'"),
        ("quantization_config", {"quant_method": "gptq"}, "'quantization_config.quant_method'"),
        ("num_experts_per_tok", 200, "'num_experts_per_tok'"),
        ("bogus_key", 1, "'bogus_key'"),
    ],
)
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ModelConfig.from_hf({**HF_671B, key: value})


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
