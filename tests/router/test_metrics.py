"""Prometheus metrics (router/metrics.py): what a scrape of a real LocalBackend shows after known requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.frontend import CompletionRequest, Frontend
from router.metrics import EXPORTED, render
from workers.engine.types import SamplingParams, TransferStats, WorkerStats

MAX_MODEL_LEN = 256
BLOCK = 16  # the engine's block size here


def scrape(backend) -> dict[tuple[str, tuple], float]:
    """Every sample of ``render(backend)``: (sample name, sorted labels without model_name) → value."""
    body, content_type = render(backend)
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k != "model_name"}
            out[(s.name, tuple(sorted(labels.items())))] = s.value
    return out


def families(backend) -> set[str]:
    return {f.name for f in text_string_to_metric_families(render(backend)[0].decode())}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def bucket_count(samples: dict, name: str) -> float:
    return value(samples, f"{name}_count")


@pytest.fixture(scope="module")
def backend(tiny_dir) -> Iterator:
    """One engine that prefills its own requests (so each gets a queue time)."""
    from cluster.local import LocalBackend
    from workers.engine.config import EngineConfig

    with LocalBackend.start(tiny_dir, engine_config=EngineConfig(max_model_len=MAX_MODEL_LEN, num_blocks=128,
                                                                     block_size=BLOCK),
                            disaggregate=False) as b:
        yield b


def run(frontend: Frontend, *reqs: CompletionRequest):
    async def go():
        return [await frontend.complete(r) for r in reqs]

    return asyncio.run(go())


def test_every_metric_is_exported(backend, tokenizer):
    names = families(backend)
    # the parser names counter families without _total
    assert set(EXPORTED) <= names, set(EXPORTED) - names
    assert "dsaserve:time_to_first_token_seconds" in names and "dsaserve:request_success" in names


def test_requests_move_counters_and_histograms(backend, tokenizer):
    frontend = Frontend(backend, tokenizer)
    before = scrape(backend)
    prefix = tuple(range(100, 100 + 3 * BLOCK))  # three full blocks, shared by the second prompt
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    reqs = [CompletionRequest(prompt_ids=prefix + (7, 8), params=params),
            CompletionRequest(prompt_ids=prefix + (9, 10, 11), params=params),
            CompletionRequest(prompt="hello metrics", params=SamplingParams(max_tokens=3, ignore_eos=True))]
    done = run(frontend, *reqs)
    after = scrape(backend)

    def moved(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert [c.finish_reason for c in done] == ["length"] * 3
    assert moved("dsaserve:prompt_tokens_total") == sum(c.usage.prompt_tokens for c in done)
    assert moved("dsaserve:prompt_tokens_total") == 2 * len(prefix) + 5 + len(tokenizer.encode("hello metrics"))
    assert moved("dsaserve:generation_tokens_total") == 5 + 5 + 3
    assert moved("dsaserve:prefix_cache_queries_total") == sum(c.usage.prompt_tokens for c in done)
    cached = sum(c.usage.cached_tokens for c in done)
    assert done[1].usage.cached_tokens == 3 * BLOCK  # the repeated prefix hit
    assert moved("dsaserve:prefix_cache_hits_total") == cached > 0
    assert moved("dsaserve:request_success_total", finished_reason="length") == 3
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert bucket_count(after, f"dsaserve:{hist}") - bucket_count(before, f"dsaserve:{hist}") == 3, hist
    # one gap per token after each request's first
    itl = "dsaserve:inter_token_latency_seconds"
    assert bucket_count(after, itl) - bucket_count(before, itl) == (5 - 1) + (5 - 1) + (3 - 1)
    # the worker frees each request just after its last output: soon none is left
    deadline = time.monotonic() + 10
    while value(after, "dsaserve:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
        after = scrape(backend)
    assert value(after, "dsaserve:num_requests_running") == 0
    assert value(after, "dsaserve:num_requests_waiting") == 0
    # cached prefix blocks count as free (evictable), as in vLLM
    assert value(after, "dsaserve:kv_cache_usage_perc") == 0.0
    assert sum(v for (n, _), v in after.items() if n == "dsaserve:routing_decisions_total") >= 3


def test_stop_string_and_abort_reasons(backend, tokenizer):
    frontend = Frontend(backend, tokenizer)
    before = scrape(backend)

    async def abandon():  # the client goes away after the first output
        stream = frontend.generate(CompletionRequest(prompt_ids=(5, 6, 7), params=SamplingParams(max_tokens=50,
                                                                                                 ignore_eos=True)))
        await anext(stream)
        await stream.aclose()

    asyncio.run(abandon())
    after = scrape(backend)
    assert value(after, "dsaserve:request_success_total", finished_reason="abort") - \
        value(before, "dsaserve:request_success_total", finished_reason="abort") == 1
    assert bucket_count(after, "dsaserve:e2e_request_latency_seconds") - \
        bucket_count(before, "dsaserve:e2e_request_latency_seconds") == 1


class _Board:
    """A cluster-mode stand-in: the backend's stats come from WorkerStats read back from JSON."""

    def __init__(self) -> None:
        self.workers = [
            WorkerStats("decode-0", "decode", waiting=2, running=3, free_blocks=30, total_blocks=100,
                        kv_transfer=TransferStats("nixl", bytes=1000, transfers=2, failures=1),
                        context_cache_hits={"host": 4, "disk": 1}),
            WorkerStats("prefill-0", "prefill", waiting=1, running=1, free_blocks=50, total_blocks=100,
                        kv_transfer=TransferStats("nixl", bytes=500, transfers=2)),
        ]
        self.routes = {"cache_hit": 3}

    def info(self):
        from router.backend import ModelInfo

        return ModelInfo("m", 10, 64, 63, 4, 16, 1, 0, 8, False)

    def stats(self) -> dict:
        return {"mode": "cluster", "router": {"routes": dict(self.routes)},
                "workers": [WorkerStats.from_json(w.to_json()) for w in self.workers]}


def test_worker_stats_aggregate_and_stay_monotonic():
    board = _Board()
    s = scrape(board)
    assert value(s, "dsaserve:num_requests_running") == 4
    assert value(s, "dsaserve:num_requests_waiting") == 3
    assert value(s, "dsaserve:kv_cache_usage_perc") == pytest.approx(120 / 200)
    assert value(s, "dsaserve:kv_transfer_bytes_total", backend="nixl") == 1000  # read side only
    assert value(s, "dsaserve:kv_transfer_failures_total", backend="nixl") == 1
    assert value(s, "dsaserve:context_cache_hits_total", tier="host") == 4
    assert value(s, "dsaserve:context_cache_hits_total", tier="disk") == 1
    assert value(s, "dsaserve:routing_decisions_total", reason="cache_hit") == 3
    assert "context_cache_hits" not in board.workers[1].to_json()  # the CLI's JSON gains a key only with tiers
    # the decode worker restarts (its counters start again from zero) and moves 200 bytes
    board.workers[0] = WorkerStats("decode-0", "decode", 0, 0, 100, 100,
                                   kv_transfer=TransferStats("nixl", bytes=200, transfers=1))
    s = scrape(board)
    assert value(s, "dsaserve:kv_transfer_bytes_total", backend="nixl") == 1200
    assert value(s, "dsaserve:context_cache_hits_total", tier="host") == 4


def test_registries_are_per_backend(backend, tokenizer):
    board = _Board()
    assert render(board)[0] != render(backend)[0]
    assert 'model_name="m"' in render(board)[0].decode()


def test_context_cache_hits_and_kv_transfers_come_from_the_engines(tiny_dir, tokenizer):
    """A prefix evicted to the host tier and restored shows in context_cache_hits_total{tier="host"};
    a disaggregated request's KV read shows in kv_transfer_bytes_total{backend="local"}."""
    from cluster.local import LocalBackend
    from workers.engine.config import EngineConfig

    def ids(n: int, seed: int) -> tuple[int, ...]:
        return tuple((seed * 7919 + i * 104729) % 50000 + 1000 for i in range(n))

    params = SamplingParams(max_tokens=2, ignore_eos=True)
    cfg = EngineConfig(num_blocks=8, host_cache_blocks=16)  # 64-token blocks: a 300-token prompt fills 5
    with LocalBackend.start(tiny_dir, engine_config=cfg, disaggregate=True) as be:
        frontend = Frontend(be, tokenizer)
        a = CompletionRequest(prompt_ids=ids(200, 1), params=params)
        run(frontend, a, *(CompletionRequest(prompt_ids=ids(300, 10 + i), params=params) for i in range(3)))
        again = run(frontend, a)[0]
        s = scrape(be)
        hits = sum(e.context_cache.hits["host"] for e in (be.prefill_engine, be.decode_engine))
        assert hits >= 3 and again.usage.cached_tokens == 192
        assert value(s, "dsaserve:context_cache_hits_total", tier="host") == hits
        moved = be.transfer.stats()["bytes"]
        assert moved > 0 and value(s, "dsaserve:kv_transfer_bytes_total", backend="local") == moved
        assert value(s, "dsaserve:request_success_total", finished_reason="length") == 5
        # disaggregated: the prefill side's queue time does not reach the router (module docstring)
        assert bucket_count(s, "dsaserve:time_to_first_token_seconds") == 5
