"""Expert parallelism across real processes (gloo): ep 2 and ep 4, and a plan with redundant experts,
give the logits (within 1e-5) and greedy tokens of one device on sparse (prompt > index_topk) and
dense-equivalent prompts; load statistics add up; a rank killed mid-request ends the request with a
clear error within the timeout and the replica reports unhealthy; ``dsaserve generate --ep-size``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest
import torch

from cluster.cli_serve import main
from cluster.ep import EPLocalBackend
from router.backend import BackendUnavailable
from workers.engine.config import EngineConfig
from workers.engine.types import GenerateRequest, SamplingParams
from workers.model import load_model
from workers.parallel import ExpertPlacement

from ..engine.conftest import prompt, reference_greedy

N_TOKENS = 6
PROMPTS = {"sparse": prompt(100, seed=31), "dense": prompt(12, seed=32)}  # index_topk is 32
CASES = {
    "ep2": (2, None),
    "ep4": (4, None),
    "ep2-redundant": (2, ExpertPlacement.balanced(torch.tensor([9.0, 1, 1, 5, 1, 1, 1, 1]), 8, 2, redundant=2)),
}


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    model = load_model(tiny_ckpt)
    logits = {name: model.logits(torch.tensor([p]))[0] for name, p in PROMPTS.items()}
    tokens = {name: reference_greedy(model, p, N_TOKENS) for name, p in PROMPTS.items()}
    return logits, tokens


async def _run(backend, req):
    outs = []
    async for out in backend.generate(req):
        outs.append(out)
    return outs


def _greedy(rid, ids, n):
    return GenerateRequest(rid, tuple(ids), SamplingParams(max_tokens=n, ignore_eos=True))


@pytest.mark.parametrize("case", list(CASES))
def test_expert_parallel_matches_one_device(case, tiny_ckpt, reference):
    size, plan = CASES[case]
    want_logits, want_tokens = reference
    with EPLocalBackend.start(tiny_ckpt, ep_size=size, placement=plan, engine_config=EngineConfig(num_blocks=64),
                              timeout_s=30) as be:
        model, ep = be.ep_group.model, be.ep
        if plan is not None:
            assert any(len(plan.layer(1).replicas(e)) > 1 for e in range(8))
        k = model.config.num_experts_per_tok
        for name, p in PROMPTS.items():
            ep.load.reset()
            got = model.logits(torch.tensor([p]))[0]
            assert (got - want_logits[name]).abs().max().item() < 1e-5, name
            assert ep.load.tokens() == {1: len(p), 2: len(p)}
            for layer, counts in ep.load.counts().items():  # tokens × experts-per-token, per layer
                assert int(counts.sum()) == len(p) * k, (name, layer)
        for name, p in PROMPTS.items():
            outs = asyncio.run(_run(be, _greedy(name, p, N_TOKENS)))
            assert [t for o in outs for t in o.new_token_ids] == want_tokens[name], name
            assert outs[-1].finish_reason == "length"
        stats = be.stats()
        assert stats["ep"]["healthy"] and all(w.healthy for w in stats["workers"])
        assert stats["ep"]["bytes_sent"] > 0


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_rank_lost_mid_request_ends_it_with_an_error(tiny_ckpt, how):
    """killed: its sockets close, the exchange fails at once; hung (SIGSTOP): after the timeout."""
    timeout_s = 4.0
    with EPLocalBackend.start(tiny_ckpt, ep_size=2, engine_config=EngineConfig(num_blocks=64), timeout_s=timeout_s) as be:
        victim = be.ep_group.pids[0]
        lost_at = None

        async def run():
            nonlocal lost_at
            outs = []
            async for out in be.generate(_greedy("long", prompt(12, seed=5), 1000)):
                outs.append(out)
                if len(outs) == 3:  # decoding: take the expert server away
                    os.kill(victim, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
                    lost_at = time.monotonic()
            return outs

        try:
            outs = asyncio.run(asyncio.wait_for(run(), timeout_s + 30))
            elapsed = time.monotonic() - lost_at
        finally:
            os.kill(victim, signal.SIGKILL)
        last = outs[-1]
        assert last.finished and last.finish_reason == "error"
        assert "expert-parallel rank" in last.error and "died or hung" in last.error
        assert sum(len(o.new_token_ids) for o in outs) < 1000
        assert elapsed < (timeout_s if how == "killed" else timeout_s + 3.0)
        stats = be.stats()
        assert not stats["ep"]["healthy"] and not any(w.healthy for w in stats["workers"])
        with pytest.raises(BackendUnavailable, match="expert-parallel|engine loop"):
            asyncio.run(_run(be, _greedy("after", prompt(12), 2)))


def test_cli_generate_ep_size_prints_what_ep_1_prints(tiny_ckpt, capsys):
    args = ["generate", "--model", str(tiny_ckpt), "--dtype", "float32",  # logprobs compared within 1e-5: float32
            "--prompt-ids", ",".join(map(str, PROMPTS["sparse"])),
            "--max-tokens", str(N_TOKENS), "--ignore-eos", "--logprobs", "2", "--json"]
    outputs = []
    for extra in ([], ["--ep-size", "2"]):
        assert main(args + extra) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    one, two = outputs
    for key in ("token_ids", "text", "finish_reason", "usage"):
        assert one[key] == two[key], key
    for a, b in zip(one["logprobs"], two["logprobs"], strict=True):
        assert a["token_id"] == b["token_id"] and abs(a["logprob"] - b["logprob"]) < 1e-5
        assert [t for t, _ in a["top"]] == [t for t, _ in b["top"]]
    assert main(args + ["--ep-size", "3"]) == 2
    assert "do not split evenly over ep_size 3" in capsys.readouterr().err
