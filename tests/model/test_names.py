"""The HF ↔ internal name table covers every tensor of the model, MTP included, both ways."""

import dataclasses

import pytest
import torch

from workers.model.model import DeepseekV32
from workers.model.names import hf_to_internal, internal_to_hf, scale_name
from workers.model.presets import PRESETS

CONFIG = dataclasses.replace(PRESETS["tiny"], vocab_size=512, num_nextn_predict_layers=2)


@pytest.fixture(scope="module")
def internal_names() -> list[str]:
    with torch.device("meta"):
        return list(DeepseekV32(CONFIG, with_mtp=True).state_dict())


def test_every_internal_name_round_trips(internal_names):
    layers = CONFIG.num_hidden_layers
    hf_names = [internal_to_hf(name, layers) for name in internal_names]
    assert len(set(hf_names)) == len(hf_names)
    assert [hf_to_internal(hf, layers) for hf in hf_names] == internal_names


def test_known_names_of_the_release(internal_names):
    layers = CONFIG.num_hidden_layers
    assert internal_to_hf("layers.1.ffn.gate.bias", layers) == "model.layers.1.mlp.gate.e_score_correction_bias"
    assert internal_to_hf("mtp.0.eh_proj.weight", layers) == "model.layers.3.eh_proj.weight"
    assert internal_to_hf("mtp.1.block.attn.wkv_a.weight", layers) == "model.layers.4.self_attn.kv_a_proj_with_mqa.weight"
    assert internal_to_hf("mtp.0.head.weight", layers) == "model.layers.3.shared_head.head.weight"
    assert {"mtp.0.eh_proj.weight", "mtp.1.block.ffn.experts.7.w2.weight", "head.weight"} <= set(internal_names)


@pytest.mark.parametrize(
    "name",
    ["model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.1.mlp.experts.gate_up_proj", "lm_head.bias", "foo"],
)
def test_foreign_names_map_to_nothing(name):
    assert hf_to_internal(name, CONFIG.num_hidden_layers) is None


def test_scale_name():
    assert scale_name("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight_scale_inv"
    with pytest.raises(ValueError):
        scale_name("model.layers.0.self_attn.indexer.k_norm.bias")
