"""Cache-aware routing on a real cluster with a real Redis KV index: 2 prefill replicas, 1 decode.
A repeated 600-token prefix is served from cache; distinct prompts use both replicas; after Redis
restarts empty, workers re-register their blocks and hits come back within seconds."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import time

import pytest
import torch

from router.client import Client

from ..redis_server import running_redis
from .conftest import VOCAB, start_cluster

pytestmark = pytest.mark.slow
PREFIX = tuple(torch.randint(2, VOCAB, (600,), generator=torch.Generator().manual_seed(11)).tolist())


def _suffix(seed: int) -> tuple[int, ...]:
    return tuple(torch.randint(2, VOCAB, (20,), generator=torch.Generator().manual_seed(seed)).tolist())


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(redis, cluster_ckpt, tmp_path_factory):
    running = start_cluster(
        tmp_path_factory.mktemp("cache-routing"), cluster_ckpt, "ray", decode_replicas=1, prefill_replicas=2,
        redis_url=redis.url, redis={"worker_ttl_s": 3}, routing={"temperature_s": 0.0},
        prefill={"num_blocks": 128}, decode={"num_blocks": 128},
    )
    yield running
    assert running.stop() == 0, running.log.read_text()[-3000:]


def _generate(address: str, ids, n: int = 2):
    with Client(address, timeout=120) as client:
        return client.generate(prompt_ids=list(ids), max_tokens=n, ignore_eos=True)


def _status(address: str) -> dict:
    with Client(address, timeout=30) as client:
        return client.status()


def _cached_after_repeat(address: str, seed: int, deadline_s: float) -> int:
    """Send the prefix with fresh suffixes until one reports ≥ 512 cached tokens (or time runs out)."""
    deadline = time.monotonic() + deadline_s
    best = 0
    while time.monotonic() < deadline:
        best = max(best, _generate(address, PREFIX + _suffix(seed)).usage.cached_tokens)
        if best >= 512:
            return best
        seed += 1
        time.sleep(0.3)
    return best


def test_batch_jobs_live_in_redis_and_run_through_the_cluster(cluster, redis):
    """Batch jobs in cluster mode (this module's cluster has Redis, so the router keeps its jobs there):
    the openai client's Batch workflow through Serve's HTTP proxy, and gRPC BatchJobs through its gRPC
    proxy. Runs before the Redis restart below, which empties Redis."""
    import io
    import json

    import openai

    from router.jobs.redis_store import RedisJobStore

    api = openai.OpenAI(base_url=f"http://127.0.0.1:{cluster.config['router']['http_port']}/v1", api_key="none",
                        max_retries=0, timeout=120)
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": list(_suffix(500 + i)), "max_tokens": 3, "temperature": 0}} for i in range(12)]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file = api.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    batch = api.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 180
    while (batch := api.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    assert batch.status == "completed" and batch.request_counts.completed == 12
    out = {json.loads(x)["custom_id"]: json.loads(x) for x in api.files.content(batch.output_file_id).text.splitlines()}
    assert sorted(out) == sorted(f"c{i}" for i in range(12))
    one = api.completions.create(model="", **lines[0]["body"])
    assert out["c0"]["response"]["body"]["choices"][0]["text"] == one.choices[0].text
    store = RedisJobStore.from_url(redis.url)
    try:
        kept = store.get_job(batch.id)
        assert kept is not None and kept.status == "completed" and len(store.results(batch.id)) == 12
    finally:
        store.close()
    with Client(cluster.address, timeout=120) as client:
        job = client.jobs.create([{"id": f"g{i}", "prompt_ids": list(_suffix(600 + i)), "max_tokens": 2,
                                   "ignore_eos": True} for i in range(5)])
        results = list(client.jobs.results(job.id))
        assert sorted(r.custom_id for r in results) == [f"g{i}" for i in range(5)]
        assert [r.offset for r in results] == list(range(5)) and all(len(r.completion.token_ids) == 2 for r in results)
        assert client.jobs.get(job.id).status == "completed"


def test_repeated_prefix_is_served_from_cache(cluster):
    first = _generate(cluster.address, PREFIX + _suffix(1))
    assert first.usage.cached_tokens == 0
    time.sleep(1.0)  # the prefill worker publishes its blocks (batched every 0.1 s)
    assert _cached_after_repeat(cluster.address, 2, 10) >= 512


def test_distinct_prompts_use_both_prefill_replicas(cluster):
    prompts = [tuple(torch.randint(2, VOCAB, (300,), generator=torch.Generator().manual_seed(100 + i)).tolist())
               for i in range(8)]
    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: _generate(cluster.address, p, 4), prompts))
    time.sleep(1.0)
    prefill = [w for w in _status(cluster.address)["workers"] if w["role"] == "prefill"]
    assert len(prefill) == 2 and all(w["requests_total"] > 0 for w in prefill), prefill


def _prefix_holders(url: str, model_id: str) -> set[str]:
    """Workers the index says hold the prefix's 9 full blocks."""
    from kvstore.hashing import block_hashes
    from kvstore.redis_index import RedisKVIndex

    async def lookup():
        index = RedisKVIndex(url, model_id, 64)
        try:
            return await index.longest_prefix(block_hashes(PREFIX, model_id=model_id, block_size=64))
        finally:
            await index.close()

    return {w for w, m in asyncio.run(lookup()).items() if m.matched_blocks == len(PREFIX) // 64}


def test_hits_return_after_redis_restarts_empty(cluster, redis, cluster_ckpt):
    _generate(cluster.address, PREFIX + _suffix(40))
    deadline = time.monotonic() + 10
    while not _prefix_holders(redis.url, cluster_ckpt.name) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _prefix_holders(redis.url, cluster_ckpt.name)
    redis.stop()
    # while Redis is down requests keep flowing, routed by load
    assert _generate(cluster.address, _suffix(50) * 5).finish_reason == "length"
    redis.start()  # same port, no data
    deadline = time.monotonic() + 60
    while True:  # the workers notice, register again and re-publish every block they hold
        holders = _prefix_holders(redis.url, cluster_ckpt.name)
        prefill = [w for w in _status(cluster.address)["workers"] if w["role"] == "prefill"]
        indexed = len(prefill) == 2 and all(w["indexed"] for w in prefill)
        if (holders and indexed) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert holders and indexed, (holders, prefill)
    # Hits come back once the index holds the blocks again (the router's broken Redis connection may
    # route a first request by load while it reconnects).
    assert _cached_after_repeat(cluster.address, 60, 20) >= 512
