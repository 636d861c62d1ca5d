"""Cluster mode on real Ray Serve: 1 prefill + 2 decode replicas behind Serve's gRPC proxy, KV over
NIXL or the Ray object store. Same outputs as local mode; status counts the KV bytes; no leaks."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from kvstore.paged import BlockLayout
from router.client import Client
from workers.model import load_model

from ..engine.conftest import reference_greedy
from .conftest import VOCAB, start_cluster

pytestmark = pytest.mark.slow

PROMPTS = {
    "sparse": tuple(torch.randint(2, VOCAB, (150,), generator=torch.Generator().manual_seed(1)).tolist()),
    "dense": tuple(torch.randint(2, VOCAB, (20,), generator=torch.Generator().manual_seed(2)).tolist()),
    "two-blocks": tuple(torch.randint(2, VOCAB, (128,), generator=torch.Generator().manual_seed(3)).tolist()),
}


@pytest.fixture(scope="module", params=["ray", "nixl"])
def cluster(request, cluster_ckpt, tmp_path_factory):
    if request.param == "nixl":
        pytest.importorskip("nixl")
    running = start_cluster(tmp_path_factory.mktemp(f"cluster-{request.param}"), cluster_ckpt, request.param)
    running.transfer = request.param
    yield running
    assert running.stop() == 0, running.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def reference(cluster_ckpt):
    model = load_model(cluster_ckpt)
    return {name: reference_greedy(model, p, 10) for name, p in PROMPTS.items()}


def _status(address: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--address", address, "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_greedy_outputs_equal_local_mode(cluster, reference):
    with Client(cluster.address, timeout=120) as client:
        for name, prompt in PROMPTS.items():
            completion = client.generate(prompt_ids=list(prompt), max_tokens=10, ignore_eos=True)
            assert list(completion.token_ids) == reference[name], name
            assert completion.usage.prompt_tokens == len(prompt) and completion.finish_reason == "length"


def test_concurrent_requests_spread_over_decode_replicas(cluster, reference):
    import concurrent.futures as cf

    with Client(cluster.address, timeout=120) as client, cf.ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(client.generate, prompt_ids=list(PROMPTS["sparse"]), max_tokens=10, ignore_eos=True)
                for _ in range(8)]
        results = [j.result() for j in jobs]
    assert all(list(r.token_ids) == reference["sparse"] for r in results)
    assert any(r.usage.cached_tokens >= 128 for r in results)  # the prefill replica's prefix cache


def test_status_counts_transferred_bytes_and_nothing_leaks(cluster, cluster_ckpt):
    """Its own disaggregated requests, on prompts no cache holds: each moves its prompt's blocks once,
    and afterwards every lease is released and every block is back in its pool."""
    from workers.model.config import ModelConfig

    mc = ModelConfig.from_hf(cluster_ckpt)
    layout = BlockLayout(num_layers=mc.num_hidden_layers, block_size=64, latent_dim=mc.latent_dim,
                         latent_dtype=torch.float32, index_dim=mc.index_head_dim, index_dtype=torch.float32)
    prompts = [tuple(torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(100 + n)).tolist())
               for n in (70, 130, 200)]
    expected = sum(-(-len(p) // 64) for p in prompts) * layout.bytes_per_block

    def totals(status: dict) -> dict:
        decode = [w for w in status["workers"] if w["role"] == "decode"]
        prefill = [w for w in status["workers"] if w["role"] == "prefill"]
        return {
            "bytes": sum(w["kv_transfer"]["bytes"] for w in decode),
            "transfers": sum(w["kv_transfer"]["transfers"] for w in decode),
            "failures": sum(w["kv_transfer"]["failures"] for w in decode),
            "decoded": sum(w["requests_total"] for w in decode),
            "prefilled": sum(w["requests_total"] for w in prefill),
            "routed": status["router"]["requests_total"],
        }

    # Counters arrive periodically: start from values that no earlier test's late update can still move
    # (every worker idle, two reads a second apart equal).
    before, last, deadline = None, None, time.monotonic() + 20
    while before is None:
        status = _status(cluster.address)
        now = totals(status)
        idle = all(w["running"] == 0 and w["free_blocks"] == w["total_blocks"] for w in status["workers"])
        if (idle and now == last) or time.monotonic() > deadline:
            before = now
        last = now if idle else None
        time.sleep(1.0)
    with Client(cluster.address, timeout=120) as client:
        for prompt in prompts:
            completion = client.generate(prompt_ids=list(prompt), max_tokens=4, ignore_eos=True)
            assert completion.finish_reason == "length" and completion.usage.cached_tokens == 0
    want = {"bytes": expected, "transfers": len(prompts), "failures": 0, "decoded": len(prompts),
            "prefilled": len(prompts), "routed": len(prompts)}
    deadline = time.monotonic() + 20
    while True:  # workers publish their counters periodically: wait until every one has caught up
        status = _status(cluster.address)
        now = totals(status)
        idle = all(w["running"] == 0 and w["free_blocks"] == w["total_blocks"] for w in status["workers"])
        if ({k: now[k] - before[k] for k in now} == want and idle) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    decode = [w for w in status["workers"] if w["role"] == "decode"]
    assert status["mode"] == "cluster" and len(decode) == 2 and len(status["workers"]) == 3
    assert all(w["kv_transfer"]["backend"] == cluster.transfer for w in decode)
    rose = {k: now[k] - before[k] for k in now}
    assert rose == want, (before, now)
    assert expected > 0
    assert idle, status  # every lease released, every block back in the pool
    assert status["router"]["in_flight"] == 0
