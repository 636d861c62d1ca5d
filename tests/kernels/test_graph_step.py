"""The step a CUDA graph captures — Triton attention with the sync-free top-k and the fused MoE over
stacked experts, at static shapes (``DecodeGraphs``) — interpreted on CPU, equals the eager PyTorch
step. ``kernels.available`` is forced on."""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_graphs import _prefilled
from workers import kernels
from workers.kernels import attend
from workers.kernels import moe as moe_kernel
from workers.engine.graphs import DecodeGraphs, prepare_fused
from workers.model.moe import MoE


@pytest.mark.skipif(torch.cuda.is_available(), reason="forces the kernels on CPU tensors (interpreted)")
def test_static_decode_through_the_kernels_and_the_fused_moe(monkeypatch):
    """The path a CUDA graph captures — Triton attention with the sync-free top-k, the fused MoE over
    stacked experts — here interpreted on CPU, equals the eager PyTorch step."""
    seqs = _prefilled(8, [20, 45, 90], seed=2)
    graphs = DecodeGraphs(seqs.model, seqs.storage, max_batch=4, max_blocks=16, capture=False)
    ids = [int(seqs.ids[s][seqs.done[s]]) for s in range(3)]
    lens = [seqs.done[s] + 1 for s in range(3)]
    with torch.inference_mode():
        eager = graphs.run(ids, [seqs.tables[s] for s in range(3)], lens).clone()  # PyTorch path
    monkeypatch.setattr(kernels, "available", lambda t: True)
    calls = {"decode": 0, "fused_moe": 0}
    for module, name in ((attend, "decode"), (moe_kernel, "fused_moe")):
        def counted(*args, _real=getattr(module, name), _name=name, **kw):
            calls[_name] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(module, name, counted)
    assert prepare_fused(seqs.model) is None
    assert all(m.stacked is not None for m in seqs.model.modules() if isinstance(m, MoE))
    with torch.inference_mode():
        static = graphs.run(ids, [seqs.tables[s] for s in range(3)], lens)
    torch.testing.assert_close(static, eager, rtol=1e-3, atol=1e-3)
    assert torch.equal(static.argmax(-1), eager.argmax(-1))
    layers = seqs.model.config.num_hidden_layers
    assert calls == {"decode": layers, "fused_moe": layers - seqs.model.config.first_k_dense_replace}




def test_engine_decodes_through_static_steps_equal_the_reference(monkeypatch):
    """An engine whose model qualifies (here: kernels forced on) runs its pure-decode steps through
    ``DecodeGraphs`` (uncaptured on CPU) and still produces the reference's greedy tokens."""
    from tests.engine.conftest import prompt, reference_greedy
    from tests.engine.test_batched_engine import _model, _run
    from workers.engine.config import EngineConfig
    from workers.engine.engine import Engine

    model = _model("tiny", topk=16)
    prompts = [prompt(40, seed=1), prompt(9, seed=2), prompt(23, seed=3)]
    want = [reference_greedy(model, p, 5) for p in prompts]
    monkeypatch.setattr(kernels, "available", lambda t: True)
    engine = Engine(model, EngineConfig(num_blocks=32, block_size=16, cuda_graph_max_batch=4))
    assert engine.runner.eager_reason == "" and engine.runner.graphs is not None
    assert _run(engine, prompts, 5) == want
    assert engine.runner.graphs.steps >= 4  # every decode step after the prompts
    eager = Engine(model, EngineConfig(num_blocks=32, block_size=16, cuda_graph_max_batch=0))
    assert eager.runner.graphs is None and "cuda_graph_max_batch = 0" in eager.runner.eager_reason


def test_a_failing_graph_falls_back_to_eager_steps(monkeypatch):
    """A capture or replay that raises (a torch/GPU limitation, not the request's fault) turns graphs off
    for good: the step runs eagerly and the tokens are the reference's."""
    from tests.engine.conftest import prompt, reference_greedy
    from tests.engine.test_batched_engine import _model, _run
    from workers.engine.config import EngineConfig
    from workers.engine.engine import Engine
    from workers.engine.graphs import DecodeGraphs as Graphs

    model = _model("tiny", topk=16)
    prompts = [prompt(12, seed=4), prompt(20, seed=5)]
    want = [reference_greedy(model, p, 3) for p in prompts]
    monkeypatch.setattr(kernels, "available", lambda t: True)

    def broken(self, *args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(Graphs, "run", broken)
    engine = Engine(model, EngineConfig(num_blocks=32, block_size=16, cuda_graph_max_batch=4))
    assert _run(engine, prompts, 3) == want
    assert engine.runner.graphs is None and "not permitted" in engine.runner.eager_reason
