"""FP8 weights stay FP8: ``FP8Linear`` equals dequantize-then-linear, a model loaded with
``fp8_weights="resident"`` computes what the dequantized one does and holds the checkpoint's bytes."""

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from workers.model import fp8
from workers.model.checkpoint import checkpoint_tensors, load_model
from workers.model.fp8 import FP8Linear, dense_weight, dequantize_weight, quantize_weight
from workers.model.names import SCALE_SUFFIX, hf_to_internal
from workers.model.presets import PRESETS
from workers.model.writer import random_state_dict, write_checkpoint

CONFIG = dataclasses.replace(PRESETS["tiny"], vocab_size=512)
LAYERS = CONFIG.num_hidden_layers


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp8")
    write_checkpoint(out, CONFIG, random_state_dict(CONFIG, with_mtp=True, seed=3), fp8=True)
    return out


def _layer(out_features: int, in_features: int, block=(128, 128), seed: int = 0):
    """A random weight's FP8Linear, with the (w8, scale_inv) it holds."""
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05
    w8, scale = quantize_weight(w, block)
    return FP8Linear.from_weight(w8, scale, block), w8, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(576, 200), (256, 384), (64, 64)], ids=["576x200-partial", "256x384", "64x64"])
def test_fp8_linear_equals_dequantize_then_linear(shape, dtype):
    layer, w8, scale = _layer(*shape)
    x = torch.randn(3, 5, shape[1]).to(dtype)
    want = F.linear(x, dequantize_weight(w8, scale, (128, 128), dtype))
    got = layer(x)
    assert got.dtype == dtype and got.shape == (3, 5, shape[0])
    assert torch.equal(got, want)
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert layer.weight_scale_inv.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    assert torch.equal(dense_weight(layer, dtype), dequantize_weight(w8, scale, (128, 128), dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_row_tiles_give_the_same_result(monkeypatch, dtype):
    """A weight over the tile budget is dequantized in whole row blocks (576 rows: 128-row tiles, a
    partial last one) and the pieces concatenated."""
    layer, w8, scale = _layer(576, 256, seed=1)
    x = torch.randn(7, 256).to(dtype)
    want = layer(x)
    monkeypatch.setattr(fp8, "_TILE_ELEMENTS", 128 * 256)
    calls = []
    real = fp8.dequantize_weight
    monkeypatch.setattr(fp8, "dequantize_weight", lambda w, *a: calls.append(w.shape) or real(w, *a))
    got = layer(x)
    assert calls == [(128, 256)] * 4 + [(64, 256)]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_other_block_shapes():
    layer, w8, scale = _layer(100, 96, block=(32, 64))
    x = torch.randn(4, 96)
    assert torch.equal(layer(x), F.linear(x, dequantize_weight(w8, scale, (32, 64), torch.float32)))


def test_every_fp8_tensor_stays_fp8_and_nothing_else(fp8_dir):
    model = load_model(fp8_dir, load_mtp=True)
    tensors = checkpoint_tensors(fp8_dir)
    fp8_weights = {hf_to_internal(n.removesuffix(SCALE_SUFFIX) + ".weight", LAYERS)
                   for n in tensors if n.endswith(SCALE_SUFFIX)}
    held = {n for n, t in model.state_dict().items() if t.dtype == torch.float8_e4m3fn}
    assert held == fp8_weights
    kinds = {n.rsplit(".", 2)[-2] for n in fp8_weights}
    assert kinds >= {"wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "wk", "w1", "w2", "w3", "eh_proj"}
    assert any(".ffn.experts." in n for n in fp8_weights) and any(".ffn.shared_experts." in n for n in fp8_weights)
    assert any(n.startswith("layers.0.ffn.w1") for n in fp8_weights)  # the dense MLP
    for name in fp8_weights:
        assert isinstance(model.get_submodule(name.removesuffix(".weight")), FP8Linear), name
    for name in ("head", "embed", "layers.1.attn.indexer.weights_proj", "layers.1.ffn.gate"):
        assert not isinstance(model.get_submodule(name), FP8Linear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_resident_model_computes_what_the_dequantized_one_does(fp8_dir, dtype):
    resident = load_model(fp8_dir, dtype=dtype)
    reference = load_model(fp8_dir, dtype=dtype, fp8_weights="dequantize")
    assert not any(isinstance(m, FP8Linear) for m in reference.modules())
    ids = torch.randint(0, CONFIG.vocab_size, (2, 45), generator=torch.Generator().manual_seed(0))  # > index_topk
    # Same float32 dequantization, rounded once into dtype: the same weights, so the same logits.
    assert torch.equal(resident.logits(ids), reference.logits(ids))
    tokens = {}
    for name, model in (("resident", resident), ("reference", reference)):
        seq = ids[:1]
        for _ in range(5):
            seq = torch.cat((seq, model.logits(seq)[:, -1].argmax(-1, keepdim=True)), dim=1)
        tokens[name] = seq[0, -5:].tolist()
    assert tokens["resident"] == tokens["reference"]


def test_resident_model_holds_the_checkpoint_bytes(fp8_dir):
    """In bfloat16 every non-FP8 tensor is held as stored, so the resident model's parameter and
    buffer bytes are the checkpoint's exactly; dequantizing costs (itemsize − 1) bytes per FP8 weight
    element, less the scales it drops."""

    def nbytes(model):
        return sum(t.nbytes for t in model.state_dict().values())

    tensors = checkpoint_tensors(fp8_dir)
    on_disk = sum(t.nbytes for t in tensors.values())
    fp8_elements = sum(t.numel for t in tensors.values() if t.dtype == "F8_E4M3")
    scale_bytes = sum(t.nbytes for n, t in tensors.items() if n.endswith(SCALE_SUFFIX))
    resident = load_model(fp8_dir, dtype=torch.bfloat16, load_mtp=True)
    assert nbytes(resident) == on_disk
    assert sum(p.nbytes for p in resident.parameters()) + sum(b.nbytes for b in resident.buffers()) == on_disk
    for dtype in (torch.bfloat16, torch.float32):
        dequantized = load_model(fp8_dir, dtype=dtype, load_mtp=True, fp8_weights="dequantize")
        margin = fp8_elements * (dtype.itemsize - 1) - scale_bytes
        assert nbytes(dequantized) - nbytes(load_model(fp8_dir, dtype=dtype, load_mtp=True)) == margin > 0


def test_bf16_checkpoint_is_unaffected(tmp_path):
    write_checkpoint(tmp_path, CONFIG, random_state_dict(CONFIG, seed=4))
    model = load_model(tmp_path)
    assert not any(isinstance(m, FP8Linear) for m in model.modules())


def test_unknown_fp8_weights_option_is_refused(fp8_dir):
    with pytest.raises(ValueError, match="fp8_weights must be one of"):
        load_model(fp8_dir, fp8_weights="fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scaled_mm_path_is_close_to_the_reference():
    layer, w8, scale = _layer(576, 512)
    layer = layer.cuda()
    x = torch.randn(33, 512, device="cuda", dtype=torch.bfloat16)
    want = layer.forward_reference(x).float()
    got = layer(x).float()
    assert layer.scaled_mm is not None  # decided on the first call, one way or the other
    assert ((got - want).norm() / want.norm()).item() < 0.05


def test_expert_parallel_serves_fp8_experts_resident(fp8_dir):
    """EP ranks load with the default (resident): their routed experts are FP8Linear, and two ranks
    give the logits of one device."""
    from cluster.ep import EPLocalBackend
    from workers.engine.config import EngineConfig
    from workers.model.moe import AbsentExpert

    ids = torch.randint(0, CONFIG.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    want = load_model(fp8_dir).logits(ids)
    with EPLocalBackend.start(fp8_dir, ep_size=2, engine_config=EngineConfig(num_blocks=64), timeout_s=30) as be:
        model = be.ep_group.model
        held = [e for e in model.layers[1].ffn.experts if not isinstance(e, AbsentExpert)]
        assert held and all(isinstance(e.w1, FP8Linear) for e in held)
        assert (model.logits(ids) - want).abs().max().item() < 1e-5


def test_cli_fp8_weights_choice_gives_the_same_completion(fp8_dir, capsys):
    import json

    from cluster.cli_serve import main

    args = ["generate", "--model", str(fp8_dir), "--dtype", "float32", "--device", "cpu", "--prompt-ids", "5,6,7,8",
            "--max-tokens", "4", "--ignore-eos", "--logprobs", "1", "--json"]
    outputs = []
    for choice in ("resident", "dequantize"):
        assert main(args + ["--fp8-weights", choice]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0]["token_ids"] == outputs[1]["token_ids"] and outputs[0]["logprobs"] == outputs[1]["logprobs"]
    assert main(args + ["--fp8-weights", "dequantize", "--ep-size", "2"]) == 2
    assert "--fp8-weights dequantize needs --ep-size 1" in capsys.readouterr().err
    assert main(args + ["--fp8-weights", "fp16"]) == 2
