"""The batched engine (one flat forward per step) gives the reference path's greedy tokens on every preset.

Each run mixes decodes and prefill chunks of several sequences in one step, reuses cached prefixes,
and is checked token for token against ``reference_greedy`` (a full causal recompute per token).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.types import GenerateRequest, SamplingParams
from workers.model.model import DeepseekV32
from workers.model.presets import PRESETS
from workers.model.writer import random_state_dict

from .conftest import prompt, reference_greedy

VOCAB = 1024


def _model(preset: str, topk: int | None = None, dtype: torch.dtype = torch.float32, scale: float = 5.0) -> DeepseekV32:
    cfg = dataclasses.replace(PRESETS[preset], vocab_size=VOCAB)
    if topk is not None:
        cfg = dataclasses.replace(cfg, index_topk=topk)
    model = DeepseekV32(cfg)
    # std 0.1 instead of 0.02: index scores and routing then differ between tokens, so top-k
    # selection and expert choice really decide something.
    weights = {k: v * scale if v.dim() >= 2 else v for k, v in random_state_dict(cfg, seed=4, with_mtp=False).items()}
    model.load_state_dict(weights, strict=False)
    return model.to(dtype).eval()


def _run(engine: Engine, prompts: list[tuple[int, ...]], new: int) -> list[list[int]]:
    outs: dict[str, list[int]] = {}
    errors = []

    def sink_for(rid):
        def sink(out):
            if out.error:
                errors.append(out.error)
            outs.setdefault(rid, []).extend(out.new_token_ids)
        return sink

    for i, p in enumerate(prompts):
        rid = f"r{i}"
        engine.add_request(GenerateRequest(rid, p, SamplingParams(max_tokens=new, ignore_eos=True)), sink_for(rid))
    while engine.has_work():
        engine.step()
    assert not errors
    return [outs[f"r{i}"] for i in range(len(prompts))]


def _mixed_steps(engine: Engine) -> list[tuple[int, int]]:
    """Record (decodes, prefill chunks) of every forward the engine runs."""
    seen: list[tuple[int, int]] = []
    real = engine.runner.run

    def run(work, num_decodes, sampled):
        seen.append((num_decodes, len(work) - num_decodes))
        return real(work, num_decodes, sampled)

    engine.runner.run = run
    return seen


# tiny: top-k 32, so prompts run sparse; tiny-128k: top-k 2048, everything dense; small: 8 layers, top-k 256.
@pytest.mark.parametrize("preset,topk", [("tiny", None), ("tiny-128k", None), ("small", 48)], ids=["tiny", "tiny-128k", "small"])
def test_mixed_batches_with_prefix_hits_equal_the_reference(preset, topk):
    model = _model(preset, topk)
    shared = prompt(128, seed=11)  # two full blocks that later prompts reuse
    prompts = [prompt(150, seed=1), prompt(37, seed=2), shared + prompt(40, seed=3), prompt(90, seed=4)]
    engine = Engine(model, EngineConfig(num_blocks=64, max_num_batched_tokens=96))
    seen = _mixed_steps(engine)
    got = _run(engine, prompts, 6)
    assert any(d and p for d, p in seen), seen  # some step ran decodes and prefill chunks together
    got += _run(engine, [shared + prompt(70, seed=5)], 6)  # a prefix hit on the first 128 tokens
    for p, tokens in zip(prompts + [shared + prompt(70, seed=5)], got):
        assert tokens == reference_greedy(model, p, 6)


def test_bfloat16_matches_float32_within_bf16_tolerance():
    """The checkpoint's weights (as ``dsaserve model init`` writes them) in bf16 and in fp32, one engine
    step over two prompts, then a decode step: logits agree to bf16 precision and pick the same tokens.

    Top-k 256 keeps these prompts on the dense path: where the indexer selects, bf16 rounding can swap
    near-tied keys of random weights (a discontinuous choice), which no tolerance bounds."""
    f32, b16 = _model("tiny", 256, scale=1.0), _model("tiny", 256, dtype=torch.bfloat16, scale=1.0)
    prompts = [prompt(30, seed=21), prompt(120, seed=22)]
    logits = {}
    for name, model in (("f32", f32), ("b16", b16)):
        engine = Engine(model, EngineConfig(num_blocks=32))
        seqs = [engine._new_sequence(GenerateRequest(f"q{i}", p), list(p)) for i, p in enumerate(prompts)]
        for seq in seqs:
            seq.block_table = engine.pool.allocate(-(-(len(seq.token_ids) + 1) // 64))
        first = engine.runner.run([(s, len(s.token_ids)) for s in seqs], 0, [True, True]).float()
        for seq, token in zip(seqs, first.argmax(-1).tolist()):
            seq.num_computed_tokens = len(seq.token_ids)
            seq.token_ids.append(token)
        logits[name] = torch.cat([first, engine.runner.run([(s, 1) for s in seqs], 2, [True, True]).float()])
    f, b = logits["f32"], logits["b16"]
    assert float(((b - f).abs().amax(-1) / f.abs().amax(-1)).max()) < 0.02
    assert torch.equal(b.argmax(-1), f.argmax(-1))
