"""The engine behind the local backend: disaggregated prefill → decode gives the reference tokens;
prefix reuse, preemption, cancellation and capacity limits behave."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.local import LocalBackend
from workers.engine.config import EngineConfig
from workers.engine.types import GenerateRequest, SamplingParams
from workers.model import load_model

from .conftest import prompt, reference_greedy


async def _run(backend, req):
    tokens, last = [], None
    async for out in backend.generate(req):
        tokens += out.new_token_ids
        last = out
    return tokens, last


def _greedy(rid, ids, n, **kw):
    return GenerateRequest(rid, tuple(ids), SamplingParams(max_tokens=n, ignore_eos=True, **kw))


@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "tiny_fp8_ckpt"], ids=["bf16", "fp8"])
@pytest.mark.parametrize("disaggregate", [True, False], ids=["prefill-decode", "both"])
def test_greedy_tokens_equal_reference(ckpt, disaggregate, request):
    path = request.getfixturevalue(ckpt)
    model = load_model(path)
    sparse, dense = prompt(150, seed=1), prompt(20, seed=2)  # index_topk is 32
    want = {p: reference_greedy(model, p, 12) for p in (sparse, dense)}
    with LocalBackend.start(path, engine_config=EngineConfig(num_blocks=64), disaggregate=disaggregate) as be:
        for i, p in enumerate((sparse, dense)):
            tokens, last = asyncio.run(_run(be, _greedy(f"r{i}", p, 12)))
            assert tokens == want[p]
            assert last.finish_reason == "length" and last.usage.completion_tokens == 12
            assert last.usage.prompt_tokens == len(p) and last.ttft_s is not None


def test_shared_prefix_is_reused(tiny_ckpt):
    base = prompt(200, seed=3)
    with LocalBackend.start(tiny_ckpt, engine_config=EngineConfig(num_blocks=64)) as be:
        first, out1 = asyncio.run(_run(be, _greedy("a", base + (5, 6), 6)))
        again, out2 = asyncio.run(_run(be, _greedy("b", base + (7,), 6)))
        same, out3 = asyncio.run(_run(be, _greedy("c", base + (5, 6), 6)))
    assert out1.usage.cached_tokens == 0
    assert out2.usage.cached_tokens == 192  # three full 64-token blocks of the shared 200
    assert out3.usage.cached_tokens == 192 and same == first


def test_preemption_under_a_tiny_block_budget_keeps_outputs(tiny_ckpt):
    model = load_model(tiny_ckpt)
    prompts = [prompt(90 + 7 * i, seed=10 + i) for i in range(6)]
    want = [reference_greedy(model, p, 40) for p in prompts]
    # 6 requests each needing 2–3 blocks, 8 blocks in all: they cannot all run at once
    cfg = EngineConfig(num_blocks=8, max_num_batched_tokens=128)
    with LocalBackend.start(tiny_ckpt, engine_config=cfg, disaggregate=False) as be:

        async def all_requests():
            return await asyncio.gather(*(_run(be, _greedy(f"p{i}", p, 40)) for i, p in enumerate(prompts)))

        results = asyncio.run(all_requests())
        assert [tokens for tokens, _ in results] == want
        assert be.decode_engine.scheduler.num_preemptions > 0
        # the last output reaches the caller just before the engine thread frees that request's blocks
        deadline = time.monotonic() + 5
        while be.decode_engine.pool.num_free != 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert be.decode_engine.pool.num_free == 8


def test_cancelled_stream_frees_its_blocks(tiny_ckpt):
    with LocalBackend.start(tiny_ckpt, engine_config=EngineConfig(num_blocks=32)) as be:

        async def cancel_after_two():
            stream = be.generate(_greedy("x", prompt(150, seed=4), 500))
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 2:
                    break
            await stream.aclose()

        asyncio.run(cancel_after_two())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            engines = (be.prefill_engine, be.decode_engine)
            if all(e.pool.num_free == 32 and not e.scheduler.running and not len(e.leases) for e in engines):
                break
            time.sleep(0.02)
        assert be.decode_engine.pool.num_free == 32 and not be.decode_engine.scheduler.running
        assert be.prefill_engine.pool.num_free == 32 and not len(be.prefill_engine.leases)


def test_request_too_large_for_the_pool_fails_cleanly_and_others_continue(tiny_ckpt):
    with LocalBackend.start(tiny_ckpt, engine_config=EngineConfig(num_blocks=4)) as be:
        _, last = asyncio.run(_run(be, _greedy("big", prompt(300, seed=5), 4)))
        assert last.finish_reason == "error" and "KV blocks" in last.error
        tokens, ok = asyncio.run(_run(be, _greedy("small", prompt(40, seed=6), 4)))
        assert ok.finish_reason == "length" and len(tokens) == 4


def test_seeded_sampling_is_reproducible_and_stop_tokens_stop(tiny_ckpt):
    with LocalBackend.start(tiny_ckpt, engine_config=EngineConfig(num_blocks=32)) as be:
        p = prompt(50, seed=7)
        params = dict(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
        a, _ = asyncio.run(_run(be, GenerateRequest("s1", p, SamplingParams(**params))))
        b, _ = asyncio.run(_run(be, GenerateRequest("s2", p, SamplingParams(**params))))
        c, _ = asyncio.run(_run(be, GenerateRequest("s3", p, SamplingParams(**{**params, "seed": 99}))))
        assert a == b and a != c
        stop_at = a[5]
        d, last = asyncio.run(_run(be, GenerateRequest("s4", p, SamplingParams(**{**params, "stop_token_ids": (stop_at,)}))))
        assert d == a[: a.index(stop_at) + 1] and last.finish_reason == "stop"


def test_logprobs_are_reported(tiny_ckpt):
    with LocalBackend.start(tiny_ckpt, engine_config=EngineConfig(num_blocks=32)) as be:
        tokens, last = asyncio.run(_collect_logprobs(be))
    assert len(tokens) == 5 and len(last) == 5
    for tok, lp in zip(tokens, last):
        assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy: the chosen token is the most likely one


async def _collect_logprobs(be):
    tokens, lps = [], []
    async for out in be.generate(GenerateRequest("lp", prompt(40, seed=8), SamplingParams(max_tokens=5, logprobs=3, ignore_eos=True))):
        tokens += out.new_token_ids
        lps += out.logprobs
    return tokens, lps


def test_failed_kv_transfer_falls_back_to_recompute_with_the_same_tokens(tiny_ckpt):
    model = load_model(tiny_ckpt)
    p = prompt(120, seed=9)
    want = reference_greedy(model, p, 8)
    with LocalBackend.start(tiny_ckpt, engine_config=EngineConfig(num_blocks=32)) as be:
        before = be.transfer.stats()
        be.transfer._storages.clear()  # the prefill worker's memory is gone: every read fails
        tokens, last = asyncio.run(_run(be, _greedy("t", p, 8)))
        after = be.transfer.stats()
        assert after["failures"] > before["failures"] and after["transfers"] == before["transfers"]
        assert tokens == want and last.finish_reason == "length"
        assert last.usage.completion_tokens == 8 and last.usage.prompt_tokens == 120
        deadline = time.monotonic() + 5
        while len(be.prefill_engine.leases) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not len(be.prefill_engine.leases)  # the holder's lease was released, not leaked


def test_a_caller_that_vanishes_does_not_stop_the_engine(tiny_ckpt):
    """A client whose event loop closes mid-stream (no clean cancel) loses its request, nothing else."""
    with LocalBackend.start(tiny_ckpt, engine_config=EngineConfig(num_blocks=32), disaggregate=False) as be:

        async def read_one_and_vanish():
            stream = be.generate(_greedy("gone", prompt(100, seed=11), 400))
            await stream.__anext__()  # then the loop closes with the stream still open

        asyncio.run(read_one_and_vanish())
        tokens, last = asyncio.run(_run(be, _greedy("next", prompt(40, seed=12), 5)))
        assert len(tokens) == 5 and last.finish_reason == "length" and be.loop.error is None
        deadline = time.monotonic() + 5
        while be.decode_engine.pool.num_free != 32 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert be.decode_engine.pool.num_free == 32 and not be.decode_engine.scheduler.running


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_evicted_prefix_comes_back_from_the_context_cache(tiny_ckpt, tmp_path, tier):
    """A prompt evicted from the device pool by other traffic is served from the host or disk tier:
    cached tokens are reported and the output is unchanged."""
    cfg = EngineConfig(num_blocks=8, host_cache_blocks=16 if tier == "host" else 0,
                       disk_cache_dir=str(tmp_path) if tier == "disk" else None, disk_cache_blocks=16)
    a = prompt(200, seed=31)
    with LocalBackend.start(tiny_ckpt, engine_config=cfg, disaggregate=False) as be:
        first, out1 = asyncio.run(_run(be, _greedy("a1", a, 5)))
        for i in range(3):  # other prompts take every block of the 8-block pool
            asyncio.run(_run(be, _greedy(f"o{i}", prompt(300, seed=40 + i), 2)))
        again, out2 = asyncio.run(_run(be, _greedy("a2", a, 5)))
        cache = be.decode_engine.context_cache
    assert out1.usage.cached_tokens == 0 and again == first
    assert out2.usage.cached_tokens == 192 and cache.hits[tier] >= 3


def test_conditional_disaggregation_prefills_short_prompts_on_the_decode_worker(tiny_ckpt):
    from router.policy import RoutingConfig

    model = load_model(tiny_ckpt)
    short, long = prompt(40, seed=51), prompt(300, seed=52)
    routing = RoutingConfig(local_prefill_max_tokens=100, temperature_s=0.0)
    with LocalBackend.start(tiny_ckpt, engine_config=EngineConfig(num_blocks=32), routing=routing) as be:
        for p in (short, long):
            tokens, _ = asyncio.run(_run(be, _greedy(f"c{len(p)}", p, 4)))
            assert tokens == reference_greedy(model, p, 4)
        assert be.prefill_engine.requests_total == 1  # only the long prompt went through prefill
        assert be.decode_engine.transfer.stats()["transfers"] == 1
