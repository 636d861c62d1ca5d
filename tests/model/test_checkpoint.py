"""Writing and loading checkpoints in DeepSeek's layout: bf16, block FP8, sharded, MTP, broken ones."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.model.checkpoint import CheckpointError, checkpoint_tensors, load_model
from workers.model.config import ConfigError, ModelConfig
from workers.model.fp8 import dequantize_weight, quantize_weight
from workers.model.names import hf_to_internal, internal_to_hf
from workers.model.presets import PRESETS
from workers.model.writer import is_fp8_weight, random_state_dict, write_checkpoint

# The tiny preset with a small vocabulary: every structural feature, files of ~3 MB.
CONFIG = dataclasses.replace(PRESETS["tiny"], vocab_size=512)
LAYERS = CONFIG.num_hidden_layers


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return random_state_dict(CONFIG, with_mtp=True, seed=0)


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, state) -> Path:
    out = tmp_path_factory.mktemp("bf16")
    write_checkpoint(out, CONFIG, state)
    return out


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory, state) -> Path:
    out = tmp_path_factory.mktemp("fp8")
    write_checkpoint(out, CONFIG, state, fp8=True)
    return out


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_weights(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_bf16_checkpoint_loads_exactly(bf16_dir, state):
    model = load_model(bf16_dir, load_mtp=True)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for name, want in state.items():
        if name.endswith("ffn.gate.bias"):
            assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], want), name
        else:
            assert torch.equal(loaded[name], want.to(torch.bfloat16).float()), name


def test_load_in_bfloat16_keeps_correction_bias_fp32(bf16_dir):
    model = load_model(bf16_dir, dtype=torch.bfloat16)
    dtypes = {name: t.dtype for name, t in model.state_dict().items()}
    assert dtypes["layers.1.ffn.gate.bias"] == torch.float32
    assert {d for n, d in dtypes.items() if not n.endswith("ffn.gate.bias")} == {torch.bfloat16}


def test_loaded_model_runs(bf16_dir):
    model = load_model(bf16_dir)
    logits = model.logits(torch.tensor([[0, 17, 42, 301, 5]]))
    assert logits.shape == (1, 5, CONFIG.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("which, dtype, fp8_weights", [
    ("bf16", torch.bfloat16, "resident"),  # the checkpoint's own dtype: .to() alone would keep the mapping
    ("fp8", torch.bfloat16, "resident"),
    ("fp8", torch.float32, "dequantize"),
])
def test_a_loaded_model_no_longer_reads_its_checkpoint(which, dtype, fp8_weights, tmp_path, bf16_dir, fp8_dir):
    """Overwriting the checkpoint's bytes in place after loading changes nothing: every weight was copied
    out of the file mapping (a mapped weight would read the new bytes, or SIGBUS on a truncated file)."""
    ckpt = _copy(bf16_dir if which == "bf16" else fp8_dir, tmp_path / which)
    ids = torch.tensor([[0, 17, 42, 301, 5]])
    model = load_model(ckpt, dtype=dtype, fp8_weights=fp8_weights)
    before = model.logits(ids)
    weights = ckpt / "model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    with open(weights, "r+b") as f:  # in place: the same inode and pages a mapping would see
        f.seek(header)
        f.write(bytes(weights.stat().st_size - header))
    assert torch.equal(model.logits(ids), before)


def test_fp8_stores_what_deepseek_quantizes(fp8_dir):
    tensors = checkpoint_tensors(fp8_dir)
    fp8 = {n for n, t in tensors.items() if t.dtype == "F8_E4M3"}
    expected = {n for n, t in tensors.items() if n.endswith(".weight") and is_fp8_weight(hf_to_internal(n, LAYERS), len(t.shape))}
    assert fp8 == expected
    for name in ("model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.0.self_attn.indexer.wk.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.experts.5.up_proj.weight",
                 "model.layers.1.mlp.shared_experts.gate_proj.weight", "model.layers.3.eh_proj.weight"):
        assert name in fp8, name
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.3.shared_head.head.weight",
                 "model.layers.1.mlp.gate.weight", "model.layers.1.self_attn.indexer.weights_proj.weight",
                 "model.layers.1.self_attn.indexer.k_norm.weight", "model.layers.1.input_layernorm.weight"):
        assert tensors[name].dtype == "BF16", name
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == "F32"
    # kv_a_proj: [kv_lora_rank + rope = 80, 128] → one partial row block
    assert tensors["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (1, 1)
    config = json.loads((fp8_dir / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]


def test_fp8_checkpoint_loads_within_fp8_rounding(fp8_dir, state):
    loaded = load_model(fp8_dir, load_mtp=True, fp8_weights="dequantize").state_dict()
    for name, want in state.items():
        if is_fp8_weight(name, want.dim()):
            w8, scale = quantize_weight(want, (128, 128), "ue8m0")
            assert torch.equal(loaded[name], dequantize_weight(w8, scale, (128, 128), torch.float32)), name
            torch.testing.assert_close(loaded[name], want, rtol=2**-4, atol=scale.max().item() * 2**-10)
        elif not name.endswith("ffn.gate.bias"):
            assert torch.equal(loaded[name], want.to(torch.bfloat16).float()), name


def test_sharded_checkpoint_loads_like_single_file(tmp_path, state, fp8_dir):
    write_checkpoint(tmp_path, CONFIG, state, fp8=True, max_shard_bytes=200_000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    sharded = load_model(tmp_path, load_mtp=True).state_dict()
    single = load_model(fp8_dir, load_mtp=True).state_dict()
    assert all(torch.equal(sharded[n], single[n]) for n in single)


def test_mtp_loaded_on_request_and_skipped_otherwise(bf16_dir, state):
    without = load_model(bf16_dir).state_dict()
    assert not any(n.startswith("mtp.") for n in without)
    with_mtp = load_model(bf16_dir, load_mtp=True).state_dict()
    assert torch.equal(with_mtp["mtp.0.eh_proj.weight"], state["mtp.0.eh_proj.weight"].to(torch.bfloat16).float())


def test_checkpoint_without_mtp_tensors(tmp_path):
    # transformers' save_pretrained keeps num_nextn_predict_layers but writes no MTP layer.
    write_checkpoint(tmp_path, CONFIG, random_state_dict(CONFIG, with_mtp=False))
    assert not load_model(tmp_path).mtp
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.3\.embed_tokens\.weight'"):
        load_model(tmp_path, load_mtp=True)


def test_transformers_save_pretrained_output_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.DeepseekV32Config(**{k: v for k, v in CONFIG.to_hf().items() if k != "architectures"})
    torch.manual_seed(0)
    reference = transformers.DeepseekV32ForCausalLM(hf_config)
    reference.save_pretrained(tmp_path)
    written = load_file(tmp_path / "model.safetensors")  # experts unfused, HF names, no MTP
    loaded = load_model(tmp_path).state_dict()
    assert len(loaded) == len(written)
    for hf_name, want in written.items():
        assert torch.equal(loaded[hf_to_internal(hf_name, LAYERS)], want.float()), hf_name


def test_progress_line_on_request(bf16_dir, capsys):
    load_model(bf16_dir, progress=True)
    assert "loading" in capsys.readouterr().err


def test_writer_refuses_a_directory_holding_a_checkpoint(bf16_dir, state):
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        write_checkpoint(bf16_dir, CONFIG, state)


def _drop(name):
    return lambda t: t.pop(name)


def _reshape(name, shape):
    return lambda t: t.__setitem__(name, torch.zeros(shape, dtype=t[name].dtype))


def _add(name):
    return lambda t: t.__setitem__(name, torch.zeros(3))


BROKEN = {
    "missing": ("bf16", _drop("model.layers.1.self_attn.kv_b_proj.weight"),
                ["missing tensor", "model.layers.1.self_attn.kv_b_proj.weight", "[256, 64]"]),
    "wrong-shape": ("bf16", _reshape("model.layers.2.mlp.experts.3.up_proj.weight", (65, 128)),
                    ["model.layers.2.mlp.experts.3.up_proj.weight", "[64, 128]", "[65, 128]"]),
    "unexpected": ("bf16", _add("model.layers.0.self_attn.rotary_emb.inv_freq"),
                   ["unexpected tensor", "model.layers.0.self_attn.rotary_emb.inv_freq"]),
    "extra-mtp-layer": ("bf16", _add("model.layers.4.enorm.weight"), ["unexpected tensor", "model.layers.4.enorm.weight"]),
    "fp8-without-scale": ("fp8", _drop("model.layers.0.self_attn.q_a_proj.weight_scale_inv"),
                          ["model.layers.0.self_attn.q_a_proj.weight", "weight_scale_inv", "missing"]),
    # dense layer 0 down_proj is [128, 384]: scale [1, 3]
    "scale-wrong-shape": ("fp8", _reshape("model.layers.0.mlp.down_proj.weight_scale_inv", (2, 2)),
                          ["model.layers.0.mlp.down_proj.weight_scale_inv", "[1, 3]", "[2, 2]"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_names_the_tensor(case, tmp_path, bf16_dir, fp8_dir):
    kind, edit, fragments = BROKEN[case]
    path = _copy(bf16_dir if kind == "bf16" else fp8_dir, tmp_path / case)
    _edit_weights(path, edit)
    with pytest.raises(CheckpointError) as err:
        load_model(path, load_mtp=True)
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("key", "value"), [("n_group", 3), ("topk_group", 5), ("kv_lora_rank", 0)], ids=["n_group", "topk_group", "kv_lora_rank"]
)
def test_bad_config_value_names_the_key(key, value, tmp_path, bf16_dir):
    path = _copy(bf16_dir, tmp_path / "ck")
    config = json.loads((path / "config.json").read_text())
    config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=key):
        load_model(path)


def test_index_naming_a_missing_shard(tmp_path, state):
    write_checkpoint(tmp_path, CONFIG, state, max_shard_bytes=500_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(tmp_path)


def test_config_round_trips_through_written_checkpoint(bf16_dir):
    assert ModelConfig.from_hf(bf16_dir) == CONFIG
    assert internal_to_hf("head.weight", LAYERS) in checkpoint_tensors(bf16_dir)


def test_file_that_is_not_safetensors(tmp_path, bf16_dir):
    path = _copy(bf16_dir, tmp_path / "ck")
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model(path)
