"""The Grafana dashboard and the router's ServiceMonitor endpoint: the dashboard queries only metrics that
router/metrics.py exports, and the chart ships both when asked."""

from __future__ import annotations

import json
import re

import helm_python as helm
import kubernetes_validate
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import EXPORTED, RouterMetrics
from tests.helm.render import CHART, render, render_values

DASHBOARD = CHART / "dashboards" / "dsaserve.json"
METRIC = re.compile(r"\bdsaserve:[A-Za-z0-9_:]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
ENABLED = {"metrics": {"serviceMonitor": {"enabled": True}, "dashboard": {"enabled": True,
                                                                        "annotations": {"grafana_folder": "LLM"}}}}


def exported_samples() -> set[str]:
    """Every sample name a scrape can hold, from the families a fresh registry describes."""
    body = RouterMetrics("m", dict).render().decode()
    out = set()
    for family in text_string_to_metric_families(body):
        out.update(family.name + s for s in SUFFIXES[family.type])
    return out


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def targets(dash: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def test_every_expression_names_exported_metrics():
    samples = exported_samples()
    assert {n for n in samples if "_bucket" in n} >= {f"{n}_bucket" for n in EXPORTED if "seconds" in n}
    exprs = targets(dashboard())
    assert len(exprs) >= 10
    for title, expr in exprs:
        names = METRIC.findall(expr)
        assert names, f"{title}: {expr} queries no dsaserve metric"
        unknown = set(names) - samples
        assert not unknown, f"{title}: {sorted(unknown)} are not exported by router/metrics.py"


def test_the_check_catches_a_wrong_name():
    samples = exported_samples()
    for wrong in ("dsaserve:time_to_first_token_seconds", "dsaserve:prompt_tokens", "dsaserve:kv_cache_usage"):
        assert wrong not in samples  # a histogram needs _bucket, a counter _total


def test_panels_cover_latency_throughput_cache_and_queues():
    exprs = {title: [e for t, e in targets(dashboard()) if t == title] for title, _ in targets(dashboard())}
    for title, metric in (("Time to first token", "time_to_first_token_seconds"),
                          ("Inter-token latency", "inter_token_latency_seconds")):
        quantiles = {re.search(r"histogram_quantile\(([0-9.]+),", e).group(1) for e in exprs[title]}
        assert quantiles == {"0.5", "0.9", "0.99"}
        assert all(f"rate(dsaserve:{metric}_bucket" in e for e in exprs[title])
    assert any("generation_tokens_total" in e for e in exprs["Tokens/s"])
    assert "prefix_cache_hits_total" in exprs["Prefix cache hit rate"][0]
    assert "prefix_cache_queries_total" in exprs["Prefix cache hit rate"][0]
    assert "kv_cache_usage_perc" in exprs["KV cache usage"][0]
    assert {"dsaserve:num_requests_running", "dsaserve:num_requests_waiting"} <= {
        n for e in exprs["Queue depth"] for n in METRIC.findall(e)}
    assert any("kv_transfer_bytes_total" in e for e in exprs["KV transfer traffic"])
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_chart_ships_the_dashboard_configmap():
    r = render_values(ENABLED)
    cm = r.one("ConfigMap", "dsaserve-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert json.loads(cm["data"]["dsaserve.json"]) == dashboard()
    for version in ("1.30.0", "1.33.0"):
        kubernetes_validate.validate(cm, version, strict=True)
    assert "dsaserve-dashboard" not in {d["metadata"]["name"] for d in render("default").of_kind("ConfigMap")}


def test_service_monitor_scrapes_the_router_http_port():
    r = render_values(ENABLED)
    sm = r.one("ServiceMonitor")
    router = r.one("Service", "dsaserve")
    http = next(p for p in router["spec"]["ports"] if p["name"] == "http")
    endpoint = next(e for e in sm["spec"]["endpoints"] if e["port"] == http["name"])
    assert endpoint["path"] == "/metrics"
    selector, labels = sm["spec"]["selector"], router["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in selector["matchLabels"].items())
    for expr in selector["matchExpressions"]:
        assert expr["operator"] == "In" and labels[expr["key"]] in expr["values"]


@pytest.mark.parametrize("kube_version", ("1.30.0", "1.33.0"))
def test_lint_strict_with_dashboard(kube_version):
    result = helm.lint(CHART, ENABLED, strict=True, kube_version=f"v{kube_version}")
    problems = [m for m in result["messages"] if m["severity"] >= 2]
    assert not result["errors"] and not problems, problems or result["errors"]
