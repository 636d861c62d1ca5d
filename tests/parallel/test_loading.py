"""A rank reads only its experts from the checkpoint; EP on one rank is the plain model; load
statistics count tokens × experts-per-token per layer."""

from __future__ import annotations

import pytest
import torch

import workers.model.checkpoint as checkpoint
from workers.model import load_model
from workers.model.moe import AbsentExpert
from workers.model.names import routed_expert_of
from workers.parallel import EPGroup, ExpertParallelError, ExpertPlacement, parallelize

from ..engine.conftest import prompt


@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "tiny_fp8_ckpt"], ids=["bf16", "fp8"])
def test_a_rank_reads_only_its_experts(ckpt, request, monkeypatch):
    path = request.getfixturevalue(ckpt)
    plan = ExpertPlacement.balanced(torch.tensor([9.0, 1, 1, 1, 1, 1, 1, 1]), 8, 4, redundant=4)
    read: list[str] = []
    real_open = checkpoint.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self._inner = real_open(*args, **kwargs)

        def __enter__(self):
            self._file = self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self._file.get_tensor(name)

    monkeypatch.setattr(checkpoint, "safe_open", Recording)
    model = load_model(path, experts=plan.holds(1))
    layers = model.config.num_hidden_layers
    mine = {(i, e) for i in range(1, layers) for e in plan.layer(i).rank_experts[1]}
    weights = [n.replace(".weight_scale_inv", ".weight") for n in read]
    assert len(weights) > len(set(weights)) or "fp8" not in request.node.name  # FP8: scales were read too
    read_experts = {routed_expert_of(checkpoint.hf_to_internal(n, layers) or "", layers) for n in weights} - {None}
    assert read_experts == mine  # other experts' tensors (and their FP8 scales) were never read
    held = {routed_expert_of(name, layers) for name in model.state_dict()} - {None}
    assert held == mine
    for i in range(1, layers):
        experts = model.layers[i].ffn.experts
        assert [e for e in range(8) if not isinstance(experts[e], AbsentExpert)] == list(plan.layer(i).rank_experts[1])
    with pytest.raises(RuntimeError, match="expert .* of layer .* is not held by this process"):
        model.logits(torch.tensor([prompt(40)]))  # the plain path needs every expert


def test_single_rank_expert_parallel_is_the_plain_model(tiny_ckpt):
    ids = torch.tensor([prompt(100, seed=3)])
    want = load_model(tiny_ckpt).logits(ids)
    model = load_model(tiny_ckpt)
    ep = parallelize(model, ExpertPlacement.contiguous(8, 1), EPGroup.single())
    assert torch.equal(model.logits(ids), want)
    tokens = ep.load.tokens()
    assert set(tokens) == {1, 2} and all(t == 100 for t in tokens.values())
    for layer, counts in ep.load.counts().items():
        assert counts.shape == (8,) and int(counts.sum()) == 100 * model.config.num_experts_per_tok


def test_a_rank_missing_its_experts_is_refused(tiny_ckpt):
    model = load_model(tiny_ckpt, experts=lambda layer, e: e < 4)
    with pytest.raises(ExpertParallelError, match="must hold expert 4 of layer 1, but it was not loaded"):
        parallelize(model, ExpertPlacement.contiguous(8, 1), EPGroup.single())
