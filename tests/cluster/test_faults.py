"""Fault injection on a real cluster: a prefill or decode replica is killed while requests stream.
Every request either completes with exactly the reference tokens (retried elsewhere; a stream never
repeats what it sent) or ends with a clear UNAVAILABLE — never garbage."""

from __future__ import annotations

import concurrent.futures as cf
import threading

import pytest
import torch

from cluster.config import ClusterConfig
from router.client import Client, DsaServeError
from router.frontend import Completion
from workers.model import load_model

from ..engine.conftest import reference_greedy
from .conftest import VOCAB, free_port

pytestmark = pytest.mark.slow
N_TOKENS = 60
PROMPT = tuple(torch.randint(2, VOCAB, (100,), generator=torch.Generator().manual_seed(7)).tolist())


@pytest.fixture(scope="module", params=["ray", "nixl"])
def live_cluster(request, cluster_ckpt):
    if request.param == "nixl":
        pytest.importorskip("nixl")
    import ray

    from cluster import app

    port = free_port()
    config = ClusterConfig.model_validate({
        "model": str(cluster_ckpt), "dtype": "float32", "transfer": request.param, "lease_s": 10, "transfer_timeout_s": 3,
        "routing": {"local_prefill_max_tokens": 0},
        "prefill": {"replicas": 1, "num_blocks": 64, "num_cpus": 0.1},
        "decode": {"replicas": 2, "num_blocks": 64, "num_cpus": 0.1},
        "router": {"grpc_port": port, "http_port": free_port()},
    })
    handle = app.start(config)
    app.wait_ready(handle, config)
    yield f"127.0.0.1:{port}", ray
    app.shutdown()


@pytest.fixture(scope="module")
def want(cluster_ckpt):
    return reference_greedy(load_model(cluster_ckpt), PROMPT, N_TOKENS)


def _replica_actors(ray, deployment: str) -> list:
    named = ray.util.list_named_actors(all_namespaces=True)
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in named if f"#{deployment}#" in a["name"]]


@pytest.mark.parametrize("victim", ["decode", "prefill"])
def test_killed_replica_mid_stream(live_cluster, want, victim):
    address, ray = live_cluster

    streaming = threading.Semaphore(0)

    def one(i: int):
        with Client(address, timeout=120) as client:
            deltas = []
            try:
                for delta in client.generate_stream(prompt_ids=list(PROMPT), max_tokens=N_TOKENS, ignore_eos=True):
                    if not deltas:
                        streaming.release()
                    deltas.append(delta)
            except DsaServeError as e:
                return e
            return Completion.from_deltas(deltas)

    with cf.ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(one, i) for i in range(6)]
        assert streaming.acquire(timeout=120), "no request started streaming"
        actors = _replica_actors(ray, victim)
        assert actors, f"no {victim} replica found"
        ray.kill(actors[0], no_restart=False)
        # the fault must hit requests in flight, or this test would show nothing
        assert not all(j.done() for j in jobs), "every request had finished before the kill"
        results = [j.result() for j in jobs]
    done = [r for r in results if not isinstance(r, DsaServeError)]
    failed = [r for r in results if isinstance(r, DsaServeError)]
    assert all(e.code.name == "UNAVAILABLE" for e in failed), failed
    assert done, "no request survived a single replica failure"
    for r in done:
        assert list(r.token_ids) == want and r.usage.completion_tokens == N_TOKENS
    # the cluster keeps serving afterwards (Serve replaces the replica)
    with Client(address, timeout=120) as client:
        again = client.generate(prompt_ids=list(PROMPT), max_tokens=8, ignore_eos=True)
    assert list(again.token_ids) == want[:8]
