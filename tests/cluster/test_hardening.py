"""Cluster mode under start-up, bad input and overload, on real Ray Serve behind Serve's gRPC proxy:
clients already calling while the cluster starts are served once workers exist (never "no decode
worker"); health says SERVING only when a Generate would succeed; the bad-input battery holds; 10×
the router's queue limit of streams with cancellations each complete or get RESOURCE_EXHAUSTED, and
afterwards every KV block is free and health is SERVING."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.client import Client
from router.proto.dsaserve.v1 import dsaserve_pb2 as pb
from router.proto.dsaserve.v1 import dsaserve_pb2_grpc as pb_grpc
from tests.battery import GOOD, GOOD_IDS, msg, overload, run_battery
from workers.model import load_model

from ..engine.conftest import reference_greedy
from .conftest import launch_cluster, wait_cluster_ready

pytestmark = pytest.mark.slow
QUEUE = 4


class StartupCaller(threading.Thread):
    """Calls health and Generate in a loop from before the port opens until ``stop``; records what it saw."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.events: list[tuple[str, str, tuple]] = []  # (kind, outcome, detail)
        self.stop = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.DsaServeStub(channel)
            while not self.stop.is_set():
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    self.events.append(("health", health_pb2.HealthCheckResponse.ServingStatus.Name(status), ()))
                except grpc.RpcError as e:
                    self.events.append(("health", e.code().name, (e.details(),)))
                try:
                    out = list(stub.Generate(msg(GOOD_IDS, **GOOD, stream=True), timeout=180))
                    self.events.append(("generate", "OK", tuple(t for r in out for t in r.token_ids)))
                except grpc.RpcError as e:
                    self.events.append(("generate", e.code().name, (e.details(),)))
                    time.sleep(0.2)


@pytest.fixture(scope="module")
def started(cluster_ckpt, tmp_path_factory):
    """A cluster launched while a client is already calling it; yields (cluster, what the caller saw)."""
    running = launch_cluster(tmp_path_factory.mktemp("cluster-hardening"), cluster_ckpt, "nixl", decode_replicas=1,
                             router={"max_queue": QUEUE, "startup_timeout_s": 180})
    caller = StartupCaller(running.address)
    caller.start()
    try:
        wait_cluster_ready(running)
        with Client(running.address, timeout=120) as c:  # one more call after the ready line
            c.generate(prompt_ids=GOOD_IDS, **GOOD)
        caller.stop.set()
        caller.join(200)
        yield running, caller.events
    finally:
        caller.stop.set()
        assert running.stop() == 0, running.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def reference(cluster_ckpt) -> tuple[int, ...]:
    return tuple(reference_greedy(load_model(cluster_ckpt), tuple(GOOD_IDS), GOOD["max_tokens"]))


def test_calls_during_startup_wait_for_workers(started, reference) -> None:
    _, events = started
    generates = [e for e in events if e[0] == "generate"]
    assert any(outcome == "OK" for _, outcome, _ in generates), events
    for _, outcome, detail in generates:
        if outcome == "OK":
            assert detail == reference
        else:  # only Serve's proxy, before the router replica exists, may refuse; never our readiness
            assert "worker" not in " ".join(detail), generates
    # once health said SERVING, every Generate succeeded
    first_serving = next(i for i, e in enumerate(events) if e[:2] == ("health", "SERVING"))
    assert all(e[1] == "OK" for e in events[first_serving:] if e[0] == "generate"), events[first_serving:]


def test_bad_input_battery(started, reference) -> None:
    running, _ = started
    with grpc.insecure_channel(running.address) as channel:
        problems = run_battery(channel, reference, message_limit=False)  # Serve's proxy sizes messages
    assert not problems, "\n".join(problems)


def test_overload_answers_resource_exhausted_and_frees_everything(started, reference) -> None:
    running, _ = started
    outcomes = asyncio.run(overload(running.address, 10 * QUEUE, reference))
    assert outcomes["done"] + outcomes["cancelled"] + outcomes["rejected"] == 10 * QUEUE, outcomes
    assert outcomes["rejected"] > 0 and outcomes["done"] > 0, outcomes
    # Serve's own queue overflow is RESOURCE_EXHAUSTED too, without our retry hint: not required here
    assert outcomes["wrong_tokens"] == outcomes["other_errors"] == 0, outcomes
    with Client(running.address, timeout=60) as c:
        deadline = time.monotonic() + 30
        while True:
            status = c.status()
            idle = status["router"]["in_flight"] == 0 and all(
                w["free_blocks"] == w["total_blocks"] and w["running"] == 0 and w["waiting"] == 0
                for w in status["workers"])
            if idle or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert idle, status
        assert c.health() == "SERVING"
        assert tuple(c.generate(prompt_ids=GOOD_IDS, **GOOD).token_ids) == reference


def test_list_models_reports_limits(started) -> None:
    running, _ = started
    with grpc.insecure_channel(running.address) as channel:
        (model,) = pb_grpc.DsaServeStub(channel).ListModels(pb.ListModelsRequest(), timeout=30).models
    assert model.limits.max_queue == QUEUE and model.limits.max_stop_strings == 16
    assert model.limits.max_prompt_chars >= 2**20
