"""CUDA graphs of decode steps and the fused MoE on a GPU: a captured step equals the eager one, a
decode step makes no host sync, the engine's greedy tokens do not change with graphs, and the fused
MoE equals the reference at V3.2's expert widths (FP8 experts)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.graphs import DecodeGraphs, prepare_fused
from workers.model.fp8 import FP8Linear, quantize_weight
from workers.model.model import DeepseekV32
from workers.model.moe import MoE
from workers.model.presets import PRESETS
from workers.model.step import StepBatch
from workers.model.writer import random_state_dict

from ..engine.conftest import prompt
from ..engine.test_batched_engine import _run

pytestmark = pytest.mark.gpu
BS = 64


def _model(dtype: torch.dtype = torch.bfloat16) -> DeepseekV32:
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=1024, index_topk=64)
    model = DeepseekV32(cfg)
    weights = {k: v * 5 if v.dim() >= 2 else v for k, v in random_state_dict(cfg, seed=4, with_mtp=False).items()}
    model.load_state_dict(weights, strict=False)
    return model.to("cuda", dtype).eval()


def test_engine_tokens_with_and_without_graphs():
    model = _model()
    prompts = [prompt(300, seed=1), prompt(40, seed=2), prompt(130, seed=3)]
    eager = Engine(model, EngineConfig(num_blocks=64, cuda_graph_max_batch=0))
    want = _run(eager, prompts, 12)
    graphed = Engine(model, EngineConfig(num_blocks=64, cuda_graph_max_batch=8))
    assert graphed.runner.eager_reason == "", graphed.runner.eager_reason
    got = _run(graphed, prompts, 12)
    assert graphed.runner.graphs.captured and graphed.runner.graphs.steps >= 10
    assert [g[:4] for g in got] == [w[:4] for w in want]  # bf16: a near-tie may flip later


def test_captured_step_equals_eager_and_syncs_nothing():
    model = _model()
    assert prepare_fused(model) is None
    engine = Engine(model, EngineConfig(num_blocks=64, cuda_graph_max_batch=0))
    storage = engine.kv.storage
    tables = [list(range(0, 6)), list(range(6, 8)), list(range(8, 12))]
    lens = [330, 100, 200]  # written by a prefill first: random ids through the eager path
    ids = [torch.randint(0, 1024, (n,), device="cuda") for n in lens]
    with torch.inference_mode():
        batch = StepBatch.build(tables, [n - 1 for n in lens], [n - 1 for n in lens], 0, BS, device="cuda")
        model.hidden_step(torch.cat([i[:-1] for i in ids]), storage, batch)
        last = [int(i[-1]) for i in ids]
        eager = DecodeGraphs(model, storage, max_batch=4, max_blocks=16, capture=False).run(last, tables, lens).clone()
        graphs = DecodeGraphs(model, storage, max_batch=4, max_blocks=16)
        first = graphs.run(last, tables, lens).clone()  # captures bucket (4, 16)
        again = graphs.run(last, tables, lens)  # replays it
        torch.testing.assert_close(first.float(), eager.float(), rtol=2e-2, atol=2e-2)
        assert torch.equal(again, first) and graphs.captured == [(4, 16)]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside the step raises
        try:
            DecodeGraphs(model, storage, max_batch=4, max_blocks=16, capture=False)._forward(4, 16)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_fused_moe_at_v32_expert_widths():
    from workers.kernels.moe import fused_moe, stack_experts

    cfg = dataclasses.replace(PRESETS["tiny"], hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=16,
                              num_experts_per_tok=8, n_group=1, topk_group=1)
    with torch.device("meta"):  # only the routed experts are used: built below on the GPU
        moe = MoE(cfg)
    torch.manual_seed(0)
    for expert in moe.experts:
        for name in ("w1", "w2", "w3"):
            lin = getattr(expert, name)
            w8, s = quantize_weight(torch.randn(lin.out_features, lin.in_features, device="cuda") * 0.02)
            setattr(expert, name, FP8Linear.from_weight(w8, s))
    x = torch.randn(64, 7168, device="cuda", dtype=torch.bfloat16)
    weights = torch.rand(64, 8, device="cuda")
    ids = torch.stack([torch.randperm(16, device="cuda")[:8] for _ in range(64)])
    with torch.inference_mode():
        want = moe.routed(x, weights, ids).float()
        stack = stack_experts(moe)
        assert stack is not None and stack.fp8
        got = fused_moe(x, weights, ids, stack).float()
    err = (got - want).norm() / want.norm()
    assert err < 2e-2, float(err)
