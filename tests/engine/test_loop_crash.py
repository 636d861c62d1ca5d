"""A forward that raises (e.g. an expert-parallel rank died) ends every request in flight with an
error at once, later requests are refused, and the backend reports unhealthy: nothing hangs."""

from __future__ import annotations

import asyncio

import pytest

from cluster.local import LocalBackend
from router.backend import BackendUnavailable
from workers.engine.config import EngineConfig
from workers.engine.types import GenerateRequest, SamplingParams

from .conftest import prompt


def test_crashed_forward_fails_requests_in_flight(tiny_ckpt):
    with LocalBackend.start(tiny_ckpt, engine_config=EngineConfig(num_blocks=64)) as be:
        runner = be.decode_engine.runner
        real, calls = runner.run, []

        def flaky(work, num_decodes, sampled):
            calls.append(len(work))
            if len(calls) == 3:
                raise RuntimeError("device lost")
            return real(work, num_decodes, sampled)

        runner.run = flaky

        async def run(rid):
            outs = []
            req = GenerateRequest(rid, prompt(20, seed=len(rid)), SamplingParams(max_tokens=50, ignore_eos=True))
            async for out in be.generate(req):
                outs.append(out)
            return outs

        async def both():
            return await asyncio.wait_for(asyncio.gather(run("a"), run("bb")), 30)

        for outs in asyncio.run(both()):
            assert outs[-1].finished and outs[-1].finish_reason == "error"
            assert "engine loop crashed: device lost" in outs[-1].error
        assert not any(w.healthy for w in be.stats()["workers"])
        with pytest.raises(BackendUnavailable, match="device lost"):
            asyncio.run(run("late"))
        # a request that reaches an engine after the crash is answered at once, not queued forever
        got = []
        be.decode_engine.add_request(GenerateRequest("direct", (5, 6), SamplingParams(max_tokens=2)), got.append)
        assert got and got[0].finish_reason == "error"
