"""Expert parallelism in cluster mode: each prefill and decode replica is 2 EP ranks (the Serve
replica + a rank actor in the replica's placement group). Tokens equal the one-device reference; a
rank actor killed mid-request ends the request with a clear error within the EP timeout, the router
stops sending to the broken replica, and Serve replaces it (new placement group, new rank actor)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from cluster.config import ClusterConfig
from router.client import Client, DsaServeError
from workers.model import load_model

from ..engine.conftest import reference_greedy
from .conftest import VOCAB, free_port

pytestmark = pytest.mark.slow
EP_TIMEOUT_S = 10
PROMPTS = {name: tuple(torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(s)).tolist())
           for name, n, s in (("sparse", 100, 41), ("dense", 12, 42))}


@pytest.fixture(scope="module")
def ep_cluster(cluster_ckpt):
    import ray

    from cluster import app

    port = free_port()
    group = {"replicas": 1, "num_blocks": 64, "num_cpus": 0.1, "ep_size": 2, "ep_timeout_s": EP_TIMEOUT_S}
    config = ClusterConfig.model_validate({
        "model": str(cluster_ckpt), "dtype": "float32", "transfer": "ray", "lease_s": 10, "transfer_timeout_s": 3,
        "routing": {"local_prefill_max_tokens": 0}, "prefill": group, "decode": group,
        "router": {"grpc_port": port, "http_port": free_port()},
    })
    handle = app.start(config)
    app.wait_ready(handle, config)
    yield f"127.0.0.1:{port}", ray
    app.shutdown()


def _workers(ray) -> list[dict]:
    board = ray.get_actor("dsaserve-stats", namespace="dsaserve")
    return ray.get(board.all.remote(), timeout=10)


def test_ep_replicas_give_the_reference_tokens(ep_cluster, cluster_ckpt):
    address, ray = ep_cluster
    model = load_model(cluster_ckpt)
    with Client(address, timeout=120) as client:
        for name, p in PROMPTS.items():
            out = client.generate(prompt_ids=list(p), max_tokens=8, ignore_eos=True)
            assert list(out.token_ids) == reference_greedy(model, p, 8), name

    def exchanged(workers: list[dict]) -> bool:
        return all(w["healthy"] and w["ep"]["ep_size"] == 2 and w["ep"]["bytes_sent"] > 0 and len(w["ep"]["pids"]) == 2
                   for w in workers)

    deadline = time.monotonic() + 15  # workers publish their counters periodically
    while not exchanged(workers := _workers(ray)) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert {w["role"] for w in workers} == {"prefill", "decode"}
    assert exchanged(workers), workers


def test_killed_rank_actor_fails_the_request_and_the_replica_is_replaced(ep_cluster):
    address, ray = ep_cluster
    decode = next(w for w in _workers(ray) if w["role"] == "decode")
    victim = decode["ep"]["pids"][1]
    killed_at: list[float] = []

    def kill() -> None:
        time.sleep(1.0)  # the request is decoding by now
        os.kill(victim, signal.SIGKILL)
        killed_at.append(time.monotonic())

    with Client(address, timeout=120) as client:
        killer = threading.Thread(target=kill)
        killer.start()
        # The engine reports the dead rank; if Serve's health check replaces the replica first, the
        # router's retries find no live decode worker: both end the request with a clear error.
        with pytest.raises(DsaServeError, match="expert-parallel rank .* died or hung|UNAVAILABLE"):
            client.generate(prompt_ids=list(PROMPTS["dense"]), max_tokens=3000, ignore_eos=True)
        assert time.monotonic() - killed_at[0] < EP_TIMEOUT_S
        killer.join()
        deadline = time.monotonic() + 120
        while True:  # the broken replica gets no requests; Serve replaces it
            try:
                out = client.generate(prompt_ids=list(PROMPTS["dense"]), max_tokens=4, ignore_eos=True)
                break
            except DsaServeError as e:
                assert "no decode worker" in str(e) or "UNAVAILABLE" in str(e.code), e
                assert time.monotonic() < deadline, "the decode replica was not replaced"
                time.sleep(2)
    assert out.finish_reason == "length"
    # The stats board keeps a dead replica's last report for its TTL: wait for the new replica's.
    deadline = time.monotonic() + 30
    while True:
        fresh = [w for w in _workers(ray) if w["role"] == "decode" and w["id"] != decode["id"]]
        if fresh or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert fresh, "no report from a replacement decode replica"
    replaced = fresh[0]
    assert replaced["healthy"] and victim not in replaced["ep"]["pids"]
