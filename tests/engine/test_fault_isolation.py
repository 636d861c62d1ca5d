"""One request's failure stays that request's: a forward, a sampling call or a command that raises
ends only the request it concerns (finish reason ``error``, its blocks freed); every other request
gets the tokens an undisturbed run gives, and the engine goes on serving."""

from __future__ import annotations

import pytest

import workers.engine.runner as runner_module
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.types import GenerateRequest, SamplingParams
from workers.model import load_model

from .conftest import prompt, reference_greedy

NUM_BLOCKS = 16
NEW = 5


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt)


def _engine(model) -> Engine:
    return Engine(model, EngineConfig(num_blocks=NUM_BLOCKS, block_size=16))


def _submit(engine: Engine, rid: str, ids, **params) -> list:
    outs: list = []
    params = {"max_tokens": NEW, "ignore_eos": True, **params}
    engine.add_request(GenerateRequest(rid, tuple(ids), SamplingParams(**params)), outs.append)
    return outs


def _drain(engine: Engine) -> None:
    for _ in range(500):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError("engine did not finish its requests")


def _tokens(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def _assert_empty(engine: Engine) -> None:
    assert engine.pool.num_free == NUM_BLOCKS and all(r == 0 for r in engine.pool.ref_count)
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine._seqs


def test_a_request_whose_forward_fails_ends_alone_and_the_others_get_reference_tokens(model):
    prompts = {rid: prompt(20 + i, seed=i) for i, rid in enumerate(["a", "bad", "b", "c"])}
    want = {rid: reference_greedy(model, p, NEW) for rid, p in prompts.items()}
    engine = _engine(model)
    real, failed_batches = engine.runner.run, []

    def poisoned(work, num_decodes, sampled):
        ids = [seq.request_id for seq, _ in work]
        # "bad" breaks any forward it is in once it has two tokens: mid-decode, inside a batch
        if any(seq.request_id == "bad" and seq.num_output_tokens >= 2 for seq, _ in work):
            failed_batches.append(ids)
            raise RuntimeError("poisoned row")
        return real(work, num_decodes, sampled)

    engine.runner.run = poisoned
    outs = {rid: _submit(engine, rid, p) for rid, p in prompts.items()}
    _drain(engine)

    assert len(failed_batches[0]) == 4 and failed_batches[1] == ["bad"]  # batch, then alone
    bad = outs.pop("bad")
    assert bad[-1].finished and bad[-1].finish_reason == "error"
    assert bad[-1].error == "engine error: RuntimeError: poisoned row"
    assert _tokens(bad) == want["bad"][:2]  # what it had before the failure, nothing more
    for rid, o in outs.items():
        assert _tokens(o) == want[rid] and o[-1].finish_reason == "length" and o[-1].error is None
    _assert_empty(engine)
    # the engine serves a new request normally (with the fault still armed for "bad" only)
    late = _submit(engine, "late", prompt(30, seed=9))
    _drain(engine)
    assert _tokens(late) == reference_greedy(model, prompt(30, seed=9), NEW)
    _assert_empty(engine)


def test_a_step_that_fails_after_writing_kv_and_sampling_is_rerun_with_the_same_tokens(model, monkeypatch):
    """The failed attempt wrote KV and consumed the seeded generators: neither may count."""
    params = [dict(), dict(temperature=1.0, seed=7), dict(temperature=0.8, top_k=50, seed=3)]
    prompts = [prompt(24 + i, seed=20 + i) for i in range(len(params))]

    def run(fail_at: int | None) -> list[list[int]]:
        engine = _engine(model)
        calls = []
        real = runner_module.sample

        def flaky(logits, ps, gens):
            out = real(logits, ps, gens)  # the generators have moved on
            calls.append(len(ps))
            if len(calls) == fail_at:
                raise RuntimeError("sampler fault")
            return out

        monkeypatch.setattr(runner_module, "sample", flaky)
        outs = [_submit(engine, f"r{i}", p, **kw) for i, (p, kw) in enumerate(zip(prompts, params))]
        _drain(engine)
        monkeypatch.undo()
        if fail_at is not None:
            assert calls[fail_at - 1] == 3  # the failure hit a batch of all three
        assert all(o[-1].finish_reason == "length" and o[-1].error is None for o in outs)
        _assert_empty(engine)
        return [_tokens(o) for o in outs]

    undisturbed = run(None)
    assert undisturbed[0] == reference_greedy(model, prompts[0], NEW)
    assert run(fail_at=2) == undisturbed  # a decode step fails


def test_a_command_that_fails_ends_only_its_request(model):
    engine = _engine(model)
    real = engine.scheduler.add

    def add(seq):
        if seq.request_id == "bad":
            raise ValueError("cannot queue")
        real(seq)

    engine.scheduler.add = add
    good = _submit(engine, "good", prompt(20, seed=1))
    bad = _submit(engine, "bad", prompt(20, seed=2))
    _drain(engine)
    assert len(bad) == 1 and bad[0].finish_reason == "error" and bad[0].error == "engine error: ValueError: cannot queue"
    assert _tokens(good) == reference_greedy(model, prompt(20, seed=1), NEW)
    _assert_empty(engine)
