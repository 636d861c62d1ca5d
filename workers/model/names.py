"""The one table between Hugging Face tensor names and our module names.

HF (DeepSeek's released checkpoints, transformers' ``save_pretrained``)    internal (``DeepseekV32``)
``model.embed_tokens.weight``                                             ``embed.weight``
``model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight``                  ``layers.{i}.attn.wkv_a.weight``
``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``                     ``layers.{i}.ffn.experts.{e}.w1.weight``
``model.layers.{N+j}.eh_proj.weight`` (MTP, N = num_hidden_layers)          ``mtp.{j}.eh_proj.weight``

FP8 scales (``*.weight_scale_inv``) follow their weight's name with the same suffix.
"""

from __future__ import annotations

import re

# Within a decoder layer: HF suffix → internal suffix (both without the trailing ".weight"/".bias").
LAYER_TABLE: dict[str, str] = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_a_proj": "attn.wq_a",
    "self_attn.q_a_layernorm": "attn.q_norm",
    "self_attn.q_b_proj": "attn.wq_b",
    "self_attn.kv_a_proj_with_mqa": "attn.wkv_a",
    "self_attn.kv_a_layernorm": "attn.kv_norm",
    "self_attn.kv_b_proj": "attn.wkv_b",
    "self_attn.o_proj": "attn.wo",
    "self_attn.indexer.wq_b": "attn.indexer.wq_b",
    "self_attn.indexer.wk": "attn.indexer.wk",
    "self_attn.indexer.k_norm": "attn.indexer.k_norm",
    "self_attn.indexer.weights_proj": "attn.indexer.weights_proj",
    "mlp.gate_proj": "ffn.w1",
    "mlp.down_proj": "ffn.w2",
    "mlp.up_proj": "ffn.w3",
    "mlp.gate": "ffn.gate",
    "mlp.shared_experts.gate_proj": "ffn.shared_experts.w1",
    "mlp.shared_experts.down_proj": "ffn.shared_experts.w2",
    "mlp.shared_experts.up_proj": "ffn.shared_experts.w3",
}
# MoE experts carry an index: mlp.experts.{e}.gate_proj → ffn.experts.{e}.w1
EXPERT_TABLE: dict[str, str] = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
# Outside the decoder layers.
GLOBAL_TABLE: dict[str, str] = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "head.weight",
}
# Extra parts of an MTP layer (besides a full decoder block).
MTP_TABLE: dict[str, str] = {
    "embed_tokens": "embed",
    "enorm": "enorm",
    "hnorm": "hnorm",
    "eh_proj": "eh_proj",
    "shared_head.norm": "head_norm",
    "shared_head.head": "head",
}
# The gate's correction bias is a buffer named differently on each side.
_SPECIAL_LEAVES: dict[str, str] = {"mlp.gate.e_score_correction_bias": "ffn.gate.bias"}

SCALE_SUFFIX = ".weight_scale_inv"
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^(?:layers\.(\d+)|mtp\.(\d+)\.block)\.ffn\.experts\.(\d+)\.")
_LEAVES = ("weight", "bias")


def _invert(table: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


def hf_to_internal(name: str, num_hidden_layers: int) -> str | None:
    """Internal name for a HF tensor name, or None when the name is not part of the model."""
    if name in GLOBAL_TABLE:
        return GLOBAL_TABLE[name]
    m = _LAYER_RE.match(name)
    if m is None:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    prefix = f"layers.{layer}." if layer < num_hidden_layers else f"mtp.{layer - num_hidden_layers}."
    if layer >= num_hidden_layers:
        inner = _map_mtp_extra(rest)
        if inner is not None:
            return prefix + inner
        prefix += "block."
    inner = _map_layer(rest)
    return None if inner is None else prefix + inner


def internal_to_hf(name: str, num_hidden_layers: int) -> str:
    """HF name for an internal parameter/buffer name (inverse of ``hf_to_internal``)."""
    inv_global = _invert(GLOBAL_TABLE)
    if name in inv_global:
        return inv_global[name]
    head, _, rest = name.partition(".")
    index, _, rest = rest.partition(".")
    if head == "layers":
        return f"model.layers.{index}.{_unmap_layer(rest, name)}"
    if head == "mtp":
        layer = num_hidden_layers + int(index)
        if rest.startswith("block."):
            return f"model.layers.{layer}.{_unmap_layer(rest[len('block.'):], name)}"
        stem, leaf = rest.rsplit(".", 1)
        inv = _invert(MTP_TABLE)
        if stem in inv:
            return f"model.layers.{layer}.{inv[stem]}.{leaf}"
    raise KeyError(f"no HF name for internal tensor {name!r}")


def _map_layer(rest: str) -> str | None:
    if rest in _SPECIAL_LEAVES:
        return _SPECIAL_LEAVES[rest]
    stem, _, leaf = rest.rpartition(".")
    if leaf not in _LEAVES:
        return None
    if stem in LAYER_TABLE:
        return f"{LAYER_TABLE[stem]}.{leaf}"
    parts = stem.split(".")
    if len(parts) == 4 and parts[:2] == ["mlp", "experts"] and parts[2].isdigit() and parts[3] in EXPERT_TABLE:
        return f"ffn.experts.{parts[2]}.{EXPERT_TABLE[parts[3]]}.{leaf}"
    return None


def _unmap_layer(rest: str, full: str) -> str:
    inv_special = _invert(_SPECIAL_LEAVES)
    if rest in inv_special:
        return inv_special[rest]
    stem, _, leaf = rest.rpartition(".")
    inv = _invert(LAYER_TABLE)
    if stem in inv:
        return f"{inv[stem]}.{leaf}"
    parts = stem.split(".")
    if len(parts) == 4 and parts[:2] == ["ffn", "experts"]:
        inv_e = _invert(EXPERT_TABLE)
        return f"mlp.experts.{parts[2]}.{inv_e[parts[3]]}.{leaf}"
    raise KeyError(f"no HF name for internal tensor {full!r}")


def _map_mtp_extra(rest: str) -> str | None:
    stem, _, leaf = rest.rpartition(".")
    if stem in MTP_TABLE and leaf in _LEAVES:
        return f"{MTP_TABLE[stem]}.{leaf}"
    return None


def routed_expert_of(internal: str, num_hidden_layers: int) -> tuple[int, int] | None:
    """``(layer, expert)`` of a routed expert's internal tensor name, else None. MTP layer j counts as
    layer ``num_hidden_layers + j`` (its ``Block.layer``)."""
    m = _EXPERT_RE.match(internal)
    if m is None:
        return None
    layer = int(m.group(1)) if m.group(1) is not None else num_hidden_layers + int(m.group(2))
    return layer, int(m.group(3))


def scale_name(weight_name: str) -> str:
    """``x.weight`` → ``x.weight_scale_inv`` (the FP8 block scale stored beside a weight)."""
    if not weight_name.endswith(".weight"):
        raise ValueError(f"{weight_name!r} is not a weight name")
    return weight_name[: -len(".weight")] + SCALE_SUFFIX
