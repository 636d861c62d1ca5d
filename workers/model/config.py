"""ModelConfig: the DeepSeek-V3.2 architecture, read from a Hugging Face ``config.json``.

Field names are the HF keys, so a config round-trips through ``to_hf``/``from_hf`` unchanged. The
reference repository's names (``dim``, ``n_layers``, ``route_scale`` ...) are accepted as aliases.
Every validation error names the offending key.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# DeepSeek's reference repository (inference/model.py ModelArgs) uses other names for the same facts.
REFERENCE_ALIASES: dict[str, str] = {
    "dim": "hidden_size",
    "inter_dim": "intermediate_size",
    "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_dense_layers": "first_k_dense_replace",
    "n_heads": "num_attention_heads",
    "n_activated_experts": "num_experts_per_tok",
    "n_expert_groups": "n_group",
    "n_limited_groups": "topk_group",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "max_seq_len": "max_position_embeddings",
}

# Keys HF configs carry that do not change the architecture we build.
IGNORED_KEYS = frozenset({
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "pretraining_tp", "attention_dropout", "attention_bias", "mlp_bias",
    "num_key_value_heads", "output_router_logits", "pad_token_id", "aux_loss_alpha", "seq_aux",
    "ep_size", "moe_layer_freq", "head_dim", "mlp_layer_types", "layer_types", "qk_head_dim",
    "router_aux_loss_coef", "rope_interleave", "_name_or_path", "original_seq_len", "rope_factor",
    "beta_fast", "beta_slow", "mscale", "index_topk_freq", "scale_fmt",
})


class ConfigError(ValueError):
    """A config value is missing or out of range; the message names the key."""


@dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension. ``factor`` ≤ 1 means plain RoPE."""

    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    @property
    def is_yarn(self) -> bool:
        return self.factor > 1.0


@dataclass(frozen=True)
class QuantConfig:
    """Block FP8 weight quantization as DeepSeek ships it (``quantization_config``)."""

    quant_method: str = "fp8"
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"
    weight_block_size: tuple[int, int] = (128, 128)
    scale_fmt: str | None = "ue8m0"


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a DeepSeek-V3.2 model (defaults: the 671B release)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = field(default_factory=lambda: RopeScaling(factor=40.0))
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    num_nextn_predict_layers: int = 1
    quantization_config: QuantConfig | None = None
    model_type: str = "deepseek_v32"

    def __post_init__(self) -> None:
        _validate(self)

    # ------------------------------------------------------------------ derived facts
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer for MLA: c_kv (kv_lora_rank) + roped k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim^-0.5 · m²`` with YaRN's ``m = 0.1·mscale_all_dim·ln(factor) + 1``."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.is_yarn and rs.mscale_all_dim:
            m = 0.1 * rs.mscale_all_dim * math.log(rs.factor) + 1.0
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    # ------------------------------------------------------------------ (de)serialization
    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> "ModelConfig":
        """Read a HF ``config.json`` (a path to the file or its folder, or the parsed dict)."""
        if isinstance(source, dict):
            raw = dict(source)
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ConfigError(f"config.json not found at {path}")
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls(**_normalize(raw))

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict (what ``dsaserve model init`` writes)."""
        # num_key_value_heads: MLA has none, but transformers reads it (DeepSeek's configs carry it too).
        out: dict[str, Any] = {"architectures": ["DeepseekV32ForCausalLM"], "num_key_value_heads": self.num_attention_heads}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "rope_scaling":
                value = None if value is None else {"type": "yarn", **asdict(value)}
            elif f.name == "quantization_config":
                if value is None:
                    continue
                value = {**asdict(value), "weight_block_size": list(value.weight_block_size)}
            out[f.name] = value
        return out


def _normalize(raw: dict[str, Any]) -> dict[str, Any]:
    """Map HF/reference keys onto ModelConfig's fields; unknown keys are an error naming them."""
    names = {f.name for f in fields(ModelConfig)}
    out: dict[str, Any] = {}
    rope_params = raw.pop("rope_parameters", None)
    for key, value in raw.items():
        key = REFERENCE_ALIASES.get(key, key)
        if key in names:
            out[key] = value
        elif key not in IGNORED_KEYS:
            raise ConfigError(f"config key {key!r}: not a DeepSeek-V3.2 config key")
    if "rope_scaling" not in out and isinstance(rope_params, dict):
        # transformers 5 writes `rope_parameters` (rope_type, rope_theta, factor, ...) instead.
        out.setdefault("rope_theta", rope_params.get("rope_theta", 10000.0))
        out["rope_scaling"] = rope_params if rope_params.get("rope_type", "default") != "default" else None
    elif "rope_scaling" not in out:
        out["rope_scaling"] = None
    out["rope_scaling"] = _rope_scaling(out.get("rope_scaling"))
    out["quantization_config"] = _quant(out.get("quantization_config"))
    if isinstance(out.get("eos_token_id"), list):
        out["eos_token_id"] = out["eos_token_id"][0]
    return out


def _rope_scaling(value: Any) -> RopeScaling | None:
    if value is None or isinstance(value, RopeScaling):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"config key 'rope_scaling': expected an object, got {value!r}")
    kind = value.get("type", value.get("rope_type"))
    if kind in (None, "default"):
        return None
    if kind != "yarn":
        raise ConfigError(f"config key 'rope_scaling.type': only 'yarn' is supported, got {kind!r}")
    known = {f.name for f in fields(RopeScaling)}
    args = {k: v for k, v in value.items() if k in known and v is not None}
    return RopeScaling(**args)


def _quant(value: Any) -> QuantConfig | None:
    if value is None or isinstance(value, QuantConfig):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"config key 'quantization_config': expected an object, got {value!r}")
    method = value.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"config key 'quantization_config.quant_method': only 'fp8' is supported, got {method!r}")
    block = value.get("weight_block_size", [128, 128])
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"config key 'quantization_config.weight_block_size': expected two positive ints, got {block!r}")
    return QuantConfig(
        quant_method="fp8",
        fmt=value.get("fmt", "e4m3"),
        activation_scheme=value.get("activation_scheme", "dynamic"),
        weight_block_size=(int(block[0]), int(block[1])),
        scale_fmt=value.get("scale_fmt", "ue8m0"),
    )


_POSITIVE = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
    "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "index_n_heads", "index_head_dim", "index_topk", "max_position_embeddings",
)


def _validate(c: ModelConfig) -> None:
    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"config key {key!r}: {msg}, got {getattr(c, key)!r}")

    for key in _POSITIVE:
        v = getattr(c, key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            fail(key, "must be a positive integer")
    for key in ("first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers", "bos_token_id", "eos_token_id"):
        v = getattr(c, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            fail(key, "must be a non-negative integer")
    if c.model_type not in ("deepseek_v32", "deepseek_v3"):
        fail("model_type", "must be 'deepseek_v32'")
    if c.first_k_dense_replace > c.num_hidden_layers:
        fail("first_k_dense_replace", f"must be ≤ num_hidden_layers ({c.num_hidden_layers})")
    if c.n_routed_experts % c.n_group:
        fail("n_group", f"must divide n_routed_experts ({c.n_routed_experts})")
    if c.topk_group > c.n_group:
        fail("topk_group", f"must be ≤ n_group ({c.n_group})")
    per_group = c.n_routed_experts // c.n_group
    if c.num_experts_per_tok > c.topk_group * per_group:
        fail("num_experts_per_tok", f"must be ≤ topk_group·experts per group ({c.topk_group * per_group})")
    if c.n_group > 1 and per_group < 2:
        fail("n_group", "must leave ≥ 2 experts per group (group score = sum of the top 2)")
    if c.topk_method != "noaux_tc":
        fail("topk_method", "only 'noaux_tc' is supported")
    if c.scoring_func != "sigmoid":
        fail("scoring_func", "only 'sigmoid' is supported")
    if c.hidden_act != "silu":
        fail("hidden_act", "only 'silu' is supported")
    if c.qk_rope_head_dim % 2:
        fail("qk_rope_head_dim", "must be even")
    if c.index_head_dim <= c.qk_rope_head_dim:
        fail("index_head_dim", f"must exceed qk_rope_head_dim ({c.qk_rope_head_dim})")
    if not (isinstance(c.routed_scaling_factor, (int, float)) and c.routed_scaling_factor > 0):
        fail("routed_scaling_factor", "must be a positive number")
    if not (isinstance(c.rms_norm_eps, (int, float)) and 0 < c.rms_norm_eps < 1):
        fail("rms_norm_eps", "must be in (0, 1)")
    if not (isinstance(c.rope_theta, (int, float)) and c.rope_theta > 1):
        fail("rope_theta", "must be > 1")
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(c, key) >= c.vocab_size:
            fail(key, f"must be < vocab_size ({c.vocab_size})")
    q = c.quantization_config
    if q is not None and q.fmt != "e4m3":
        raise ConfigError(f"config key 'quantization_config.fmt': only 'e4m3' is supported, got {q.fmt!r}")
    rs = c.rope_scaling
    if rs is not None:
        if not rs.factor > 0:
            raise ConfigError(f"config key 'rope_scaling.factor': must be > 0, got {rs.factor!r}")
        if rs.original_max_position_embeddings <= 0:
            raise ConfigError(
                "config key 'rope_scaling.original_max_position_embeddings': must be positive, "
                f"got {rs.original_max_position_embeddings!r}"
            )
