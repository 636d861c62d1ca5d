"""``dsaserve k8s status``: the at-a-glance view from a RayService and its pods; the CLI's errors; the
planner's metrics read from a real router."""

from __future__ import annotations

import copy
import dataclasses
import json
from datetime import datetime, timezone

import pytest

from cluster import k8s
from cluster.cli import main
from cluster.k8s import format_status, pod_selector, summarize
from tests.helm.render import render
from workers.engine.types import WorkerStats

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


def _rayservice() -> dict:
    rs = copy.deepcopy(render("default").rayservice)
    rs["metadata"]["namespace"] = "llm"
    rs["status"] = {
        "serviceStatus": "Running", "numServeEndpoints": 2,
        "conditions": [{"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints"},
                       {"type": "UpgradeInProgress", "status": "False"}],
        "activeServiceStatus": {
            "rayClusterName": "dsaserve-raycluster-x7k2p",
            "rayClusterStatus": {"state": "ready", "readyWorkerReplicas": 2, "desiredWorkerReplicas": 2},
            "applicationStatuses": {"dsaserve": {"status": "RUNNING", "serveDeploymentStatuses": {
                "prefill": {"status": "HEALTHY"}, "decode": {"status": "HEALTHY"},
                "router": {"status": "UPDATING", "message": "1 of 2 replicas"}}}},
        },
    }
    return rs


def _pod(name, component, *, ready=True, phase="Running", restarts=0, gpus=0, waiting=None, age_s=300):
    limits = {"cpu": "8"} | ({"nvidia.com/gpu": str(gpus)} if gpus else {})
    state = {"waiting": {"reason": waiting}} if waiting else {"running": {}}
    created = datetime.fromtimestamp(NOW.timestamp() - age_s, timezone.utc).isoformat().replace("+00:00", "Z")
    return {"metadata": {"name": name, "creationTimestamp": created,
                         "labels": {"app.kubernetes.io/instance": "dsaserve", "app.kubernetes.io/component": component}},
            "spec": {"nodeName": "gpu-node-1", "containers": [{"name": "ray", "resources": {"limits": limits}}]},
            "status": {"phase": phase, "containerStatuses": [{"ready": ready, "restartCount": restarts, "state": state}]}}


PODS = [
    _pod("dsaserve-raycluster-x7k2p-head-abcde", "head", age_s=7200),
    _pod("dsaserve-raycluster-x7k2p-prefill-worker-fgh", "prefill", gpus=1, restarts=1),
    _pod("dsaserve-raycluster-x7k2p-decode-worker-ijk", "decode", gpus=1, ready=False, phase="Pending",
         waiting="ContainerCreating", age_s=40),
    _pod("dsaserve-redis-0", "redis", age_s=90000),
]

ROUTER_STATUS = {"mode": "cluster", "router": {"requests_total": 12, "in_flight": 5, "errors_total": 0}, "workers": [
    WorkerStats("prefill-1", "prefill", waiting=1, running=2, free_blocks=100, total_blocks=200).to_json(),
    WorkerStats("decode-1", "decode", waiting=0, running=4, free_blocks=150, total_blocks=200).to_json(),
]}


def test_summary_reads_service_apps_and_pods():
    s = summarize(_rayservice(), PODS, ROUTER_STATUS, now=NOW)
    assert s["rayservice"] == "llm/dsaserve" and s["service_status"] == "Running" and s["ready"] == "True"
    assert s["replicas"] == {"prefill": 1, "decode": 1}
    (cluster,) = s["clusters"]
    assert cluster["role"] == "active" and cluster["workers_ready"] == 2
    assert cluster["applications"]["dsaserve"]["deployments"]["router"] == "UPDATING"
    pods = {p["name"]: p for p in s["pods"]}
    decode = pods["dsaserve-raycluster-x7k2p-decode-worker-ijk"]
    assert (decode["ready"], decode["status"], decode["gpus"], decode["age"]) == ("0/1", "ContainerCreating", 1, "40s")
    assert pods["dsaserve-redis-0"]["age"] == "1d" and pods["dsaserve-raycluster-x7k2p-head-abcde"]["age"] == "2h"
    assert s["router"]["queue_depth"] == 5 and s["router"]["decode"]["kv_used"] == 0.25
    json.dumps(s)  # --json prints it


def test_status_reads_at_a_glance():
    text = format_status(summarize(_rayservice(), PODS, ROUTER_STATUS, now=NOW))
    lines = text.splitlines()
    assert lines[0] == "RayService llm/dsaserve  Running  ready=True (NonZeroServeEndpoints)  serve endpoints 2"
    assert "replicas  prefill 1  decode 1" in lines
    assert "active cluster dsaserve-raycluster-x7k2p  ready  workers 2/2 ready" in lines
    assert "  app dsaserve  RUNNING" in lines and "    router     UPDATING" in lines
    assert any(line.startswith("router  queue depth 5") for line in lines)
    header = next(line for line in lines if line.lstrip().startswith("NAME"))
    assert header.split() == ["NAME", "COMPONENT", "READY", "STATUS", "RESTARTS", "GPUS", "NODE", "AGE"]
    row = next(line for line in lines if "decode-worker" in line)
    assert row.split()[1:] == ["decode", "0/1", "ContainerCreating", "0", "1", "gpu-node-1", "40s"]


def test_status_of_a_rayservice_still_starting():
    rs = copy.deepcopy(render("default").rayservice)
    rs["metadata"]["namespace"] = "llm"
    s = summarize(rs, [], now=NOW)
    assert s["service_status"] == "NotReady" and s["clusters"] == [] and s["ready"] == "Unknown"
    assert format_status(s).splitlines()[-1] == "pods: none"
    assert pod_selector(rs) == "app.kubernetes.io/instance=dsaserve"


class FakeKube:
    def __init__(self, items):
        self.items = items

    def list_rayservices(self, namespace, selector=k8s.CHART_SELECTOR):
        assert selector == "app.kubernetes.io/part-of=dsaserve"
        return [i for i in self.items if i["metadata"]["namespace"] == namespace]

    def get_rayservice(self, namespace, name):
        for i in self.list_rayservices(namespace):
            if i["metadata"]["name"] == name:
                return i
        raise k8s.K8sError(f"RayService {namespace}/{name}: not found")

    def list_pods(self, namespace, selector):
        assert selector == "app.kubernetes.io/instance=dsaserve"
        return PODS


def test_cli_status_finds_the_only_rayservice(monkeypatch, capsys):
    monkeypatch.setattr(k8s.Kube, "connect", classmethod(lambda cls, context=None: FakeKube([_rayservice()])))
    assert main(["k8s", "status", "-n", "llm"]) == 0
    assert capsys.readouterr().out.startswith("RayService llm/dsaserve  Running")
    assert main(["k8s", "status", "-n", "llm", "--name", "dsaserve", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["replicas"] == {"prefill": 1, "decode": 1}
    assert main(["k8s", "status", "-n", "other"]) == 2
    assert "0 dsaserve RayServices in other (none): name one with --name" in capsys.readouterr().err


def test_cli_without_a_cluster_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["k8s", "status", "-n", "llm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsaserve: error: no Kubernetes credentials") and err.count("\n") == 1
    assert main(["k8s", "plan", "--router", "x:1", "--prefill-replicas", "3:2"]) == 2
    assert "MIN:MAX" in capsys.readouterr().err


def test_planner_metrics_from_a_real_router(tmp_path):
    """The metrics source reads a live router's status and measures TTFT with a one-token probe."""
    from cluster.local import LocalBackend
    from tests.router.conftest import ServerThread
    from workers.engine.config import EngineConfig
    from workers.model.presets import load_preset
    from workers.model.writer import random_state_dict, write_checkpoint

    cfg = dataclasses.replace(load_preset("tiny"), vocab_size=512)
    write_checkpoint(tmp_path, cfg, random_state_dict(cfg, seed=3))
    with LocalBackend.start(tmp_path, engine_config=EngineConfig(num_blocks=64, max_model_len=256)) as backend:
        server = ServerThread(backend, None)
        try:
            metrics = k8s.router_metrics(server.address, timeout_s=30)()
        finally:
            server.stop()
    assert metrics.ttft_ms is not None and metrics.ttft_ms > 0
    assert metrics.prefill.replicas == 1 and metrics.decode.replicas == 1
    assert metrics.decode.total_blocks == 64 and metrics.queue_depth == 0
