"""When a step fails outside any one request, the engine loop ends every request in flight with the
error at once, resets its engines and serves again; an expert-parallel failure stays fatal (the
backend reports unhealthy and refuses requests). Nothing hangs either way."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.local import LocalBackend
from router.backend import BackendUnavailable
from workers.engine.config import EngineConfig
from workers.engine.types import GenerateRequest, SamplingParams
from workers.model import load_model
from workers.parallel.group import ExpertParallelError

from .conftest import prompt, reference_greedy

NUM_BLOCKS = 64


async def _run(be, rid: str, n: int = 50) -> list:
    outs = []
    req = GenerateRequest(rid, prompt(20, seed=len(rid)), SamplingParams(max_tokens=n, ignore_eos=True))
    async for out in be.generate(req):
        outs.append(out)
    return outs


def _two_in_flight(be) -> list[list]:
    async def both():
        return await asyncio.wait_for(asyncio.gather(_run(be, "a"), _run(be, "bb")), 60)

    return asyncio.run(both())


def _wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def test_a_crash_outside_any_request_fails_those_in_flight_then_the_loop_restarts(tiny_ckpt):
    with LocalBackend.start(tiny_ckpt, engine_config=EngineConfig(num_blocks=NUM_BLOCKS)) as be:
        be.loop.RESTART_PAUSE_S = 1.0  # long enough to see the restarting state
        sched = be.decode_engine.scheduler
        real, fired = sched.schedule, []

        def broken():
            if not fired and sum(s.num_output_tokens >= 3 for s in sched.running) == 2:
                fired.append(True)
                raise RuntimeError("scheduler bug")
            return real()

        sched.schedule = broken
        for outs in _two_in_flight(be):
            assert outs[-1].finished and outs[-1].finish_reason == "error"
            assert outs[-1].error == "engine loop crashed: scheduler bug"
        assert be.loop.health_error() == "engine loop restarting after a crash: scheduler bug"
        assert be.health_error() is not None
        assert _wait(lambda: be.loop.health_error() is None)
        assert be.loop.restarts == 1 and be.loop.error is None and str(be.loop.last_crash) == "scheduler bug"
        for engine in (be.prefill_engine, be.decode_engine):  # reset to a clean state
            assert engine.pool.num_free == NUM_BLOCKS and all(r == 0 for r in engine.pool.ref_count)
            assert not engine.pool.hash_to_block and not len(engine.leases) and not len(engine.importer)
            assert not engine.scheduler.running and not engine.scheduler.waiting and not engine._seqs
        # it serves again, with the reference tokens, through the disaggregated path
        outs = asyncio.run(_run(be, "after", n=6))
        assert [t for o in outs for t in o.new_token_ids] == reference_greedy(load_model(tiny_ckpt), prompt(20, seed=5), 6)
        assert outs[-1].finish_reason == "length" and be.health_error() is None
        assert all(w.healthy for w in be.stats()["workers"])


def test_an_expert_parallel_failure_stays_fatal(tiny_ckpt):
    with LocalBackend.start(tiny_ckpt, engine_config=EngineConfig(num_blocks=NUM_BLOCKS)) as be:
        be.loop.RESTART_PAUSE_S = 0.01
        runner = be.decode_engine.runner
        real, calls = runner.run, []

        def rank_lost(work, num_decodes, sampled):
            calls.append(len(work))
            if len(calls) == 3:
                raise ExpertParallelError("rank 1 exited")
            return real(work, num_decodes, sampled)

        runner.run = rank_lost
        for outs in _two_in_flight(be):
            assert outs[-1].finished and outs[-1].finish_reason == "error"
            assert outs[-1].error == "engine loop crashed: rank 1 exited"
        time.sleep(0.2)  # well past a restart pause: none comes
        assert isinstance(be.loop.error, ExpertParallelError) and be.loop.restarts == 0
        assert be.loop.health_error() == "engine loop crashed: rank 1 exited"
        assert not any(w.healthy for w in be.stats()["workers"])
        with pytest.raises(BackendUnavailable, match="rank 1 exited"):
            asyncio.run(_run(be, "late"))
        # a request that reaches an engine after the crash is answered at once, not queued forever
        got = []
        be.decode_engine.add_request(GenerateRequest("direct", (5, 6), SamplingParams(max_tokens=2)), got.append)
        assert got and got[0].finish_reason == "error"
