"""An FP8-quantized, sharded checkpoint of the same weights gives the logits of a reference run
(transformers) on the dequantized weights; MTP loads and predicts."""

from __future__ import annotations

import torch

from workers.model import load_model
from workers.model.writer import write_checkpoint

from .hf_reference import hf_logits, hf_model, rel_err, save_hf


def test_fp8_sharded_checkpoint_matches_reference_on_dequantized_weights(tmp_path):
    from transformers import DeepseekV32ForCausalLM

    original = load_model(save_hf(hf_model(seed=7), tmp_path / "hf"))
    fp8_dir = tmp_path / "fp8"
    files = write_checkpoint(fp8_dir, original.config, original.state_dict(), fp8=True, max_shard_bytes=200_000)
    assert (fp8_dir / "model.safetensors.index.json").is_file() and len([f for f in files if f.suffix == ".safetensors"]) > 1
    quantized = load_model(fp8_dir, fp8_weights="dequantize")
    # weights moved by FP8 rounding, not by more
    for name, w in original.state_dict().items():
        q = quantized.state_dict()[name]
        assert torch.allclose(q, w, rtol=2**-3, atol=w.abs().max().item() * 2**-3 + 1e-6), name
    assert not torch.equal(quantized.layers[1].attn.wq_a.weight, original.layers[1].attn.wq_a.weight)

    # reference: transformers on exactly the dequantized weights (written back unquantized, fp32)
    deq_dir = tmp_path / "dequantized"
    write_checkpoint(deq_dir, quantized.config, quantized.state_dict(), dtype=torch.float32)
    reference = DeepseekV32ForCausalLM.from_pretrained(deq_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(0))
    assert rel_err(quantized.logits(ids), hf_logits(reference, ids)) < 1e-4


@torch.inference_mode()
def test_mtp_layer_loads_and_predicts(tmp_path):
    from workers.model.presets import load_preset
    from workers.model.writer import random_state_dict
    import dataclasses

    cfg = dataclasses.replace(load_preset("tiny"), vocab_size=512)
    write_checkpoint(tmp_path, cfg, random_state_dict(cfg, with_mtp=True, seed=3))
    model = load_model(tmp_path, load_mtp=True)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(11)[None]
    hidden = model.hidden(ids[:, :-1], positions)
    draft = model.mtp_logits(hidden, ids[:, 1:], positions)
    assert draft.shape == (1, 11, 512) and torch.isfinite(draft).all()
    # incremental MTP with a cache (its own cache layer after the decoder layers) equals the full pass
    cache = model.new_cache(1, 16)
    steps = []
    for t in range(11):
        h = model.hidden(ids[:, t : t + 1], positions[:, t : t + 1], cache)
        steps.append(model.mtp_logits(h, ids[:, t + 1 : t + 2], positions[:, t : t + 1], cache))
    assert rel_err(torch.cat(steps, dim=1), draft) < 1e-5
    assert not len(load_model(tmp_path).mtp)  # skipped unless asked
