"""TLS and the readiness probe in the chart, rendered with real Helm: the tls-front sidecar beside the
Ray head, Serve's proxy moved to tls.proxyPort, the Service and planner following it, the Secret, and
the worker pods' exec probe, which is a real `dsaserve client health` command line."""

from __future__ import annotations

import functools
from concurrent import futures
from pathlib import Path

import grpc
import helm_python as helm
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cluster.cli import build_parser, main
from tests.helm.render import CHART, VALUES, chart, render, render_values
from tests.helm.test_validate import KUBE_VERSIONS, _validate
from tests.k8s.crd import crd_errors
from tests.tls_certs import make_authority

SECRET_VALUES = yaml.safe_load((VALUES / "tls.yaml").read_text())
TLS_DIR = "/etc/dsaserve/tls"


@functools.lru_cache(maxsize=None)
def _pem(tmp: str) -> dict[str, str]:
    a = make_authority(Path(tmp), "chart")
    return {"cert": Path(a.server_cert).read_text(), "key": Path(a.server_key).read_text(), "ca": Path(a.ca).read_text()}


@pytest.fixture(scope="module")
def inline_values(tmp_path_factory) -> dict:
    return {"tls": {"enabled": True, **_pem(str(tmp_path_factory.mktemp("pki")))}}


@pytest.fixture(scope="module")
def with_secret():
    return render_values(SECRET_VALUES, "tls-secret")


@pytest.fixture(scope="module")
def inline(inline_values):
    return render_values(inline_values, "tls-inline")


def _container(template: dict, name: str) -> dict:
    return next(c for c in template["spec"]["containers"] if c["name"] == name)


def _ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def test_without_tls_workers_probe_their_serve_proxy_and_the_head_is_left_to_kuberay():
    r = render("default")
    pods = r.pod_templates()
    assert [c["name"] for c in pods["head"]["spec"]["containers"]] == ["ray-head"]
    assert "readinessProbe" not in pods["head"]["spec"]["containers"][0]  # KubeRay deploys Serve once the head is Ready
    for kind in ("prefill", "decode"):
        probe = _container(pods[kind], "ray-worker")["readinessProbe"]
        assert probe["exec"]["command"][:5] == ["dsaserve", "client", "health", "--address=127.0.0.1:50051", "--timeout=7"]
        assert probe["timeoutSeconds"] == 10 and probe["failureThreshold"] >= 1
    assert r.serve_config["grpc_options"]["port"] == 50051
    api = r.one("Service", "dsaserve")
    assert "ray.io/node-type" not in api["spec"]["selector"] and api["spec"]["ports"][0]["appProtocol"] == "kubernetes.io/h2c"
    off = render_values({"router": {"readinessProbe": {"enabled": False}}}).pod_templates()["decode"]
    assert "readinessProbe" not in off["spec"]["containers"][0]


def test_tls_front_runs_beside_the_head_on_the_public_port(with_secret):
    pods = with_secret.pod_templates()
    head = pods["head"]
    assert [c["name"] for c in head["spec"]["containers"]] == ["ray-head", "tls-front"]  # KubeRay's Ray container first
    front = _container(head, "tls-front")
    assert front["command"] == ["dsaserve", "tls-front"]
    assert front["args"] == ["--listen=[::]:50051", "--upstream=127.0.0.1:50061", f"--tls-cert={TLS_DIR}/tls.crt",
                             f"--tls-key={TLS_DIR}/tls.key", f"--tls-client-ca={TLS_DIR}/ca.crt"]
    assert _ports(front) == {"grpc": 50051} and front["readinessProbe"]["tcpSocket"] == {"port": "grpc"}
    assert front["securityContext"]["readOnlyRootFilesystem"] and front["volumeMounts"][0]["mountPath"] == TLS_DIR
    volume = next(v for v in head["spec"]["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == "dsaserve-grpc-tls"
    # Serve's proxy (every Ray pod) moved to the internal port; only the front holds the public one.
    assert with_secret.serve_config["grpc_options"]["port"] == 50061
    for kind in ("head", "prefill", "decode"):
        ray = pods[kind]["spec"]["containers"][0]
        assert _ports(ray)["grpc-plain"] == 50061 and "grpc" not in _ports(ray)
    for kind in ("prefill", "decode"):  # the key stays on the head
        assert not [v for v in pods[kind]["spec"]["volumes"] if v["name"] == "tls"]
    probe = _container(pods["decode"], "ray-worker")["readinessProbe"]["exec"]["command"]
    assert "--address=127.0.0.1:50061" in probe
    assert "dsaserve-tls" not in {s["metadata"]["name"] for s in with_secret.of_kind("Secret")}  # it exists already


def test_service_planner_and_network_policy_follow_the_front(with_secret):
    api = with_secret.one("Service", "dsaserve")
    assert api["spec"]["selector"]["ray.io/node-type"] == "head"  # only the head terminates TLS
    grpc_port = next(p for p in api["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["port"] == 50051 and grpc_port["targetPort"] == "grpc" and "appProtocol" not in grpc_port
    planner = with_secret.one("Deployment", "dsaserve-planner")["spec"]["template"]["spec"]["containers"][0]
    assert "--router=dsaserve-head-svc.llm.svc:50061" in planner["args"]
    policy = with_secret.one("NetworkPolicy", "dsaserve-ray")
    opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
    assert 50051 in opened and 50061 not in opened  # the plaintext proxy: this release's pods only


def test_inline_pem_becomes_a_tls_secret(inline, inline_values):
    secret = inline.one("Secret", "dsaserve-tls")
    assert secret["type"] == "kubernetes.io/tls"
    want = {"tls.crt": inline_values["tls"]["cert"], "tls.key": inline_values["tls"]["key"],
            "ca.crt": inline_values["tls"]["ca"]}
    assert secret["stringData"] == want
    head = inline.pod_templates()["head"]
    assert next(v for v in head["spec"]["volumes"] if v["name"] == "tls")["secret"]["secretName"] == "dsaserve-tls"
    assert not any(a.startswith("--tls-client-ca") for a in _container(head, "tls-front")["args"])  # clientAuth off


@pytest.mark.parametrize("case", ["secret", "inline"])
def test_tls_manifests_validate(case, inline_values):
    values = SECRET_VALUES if case == "secret" else inline_values
    result = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSIONS[-1]}")
    problems = [m for m in result["messages"] if m["severity"] >= 2]
    assert not result["errors"] and not problems, problems or result["errors"]
    r = render_values(values, case)
    assert not crd_errors(r.rayservice)
    for version in KUBE_VERSIONS:
        for doc in r.docs:
            if doc["kind"] not in ("RayService", "ServiceMonitor"):
                _validate(doc, version)
        for name, template in r.pod_templates().items():
            _validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template},
                      version)


SCHEMA_ERRORS = {
    "misspelled key": ({"tls": {"enabled": True, "secretname": "x"}}, "'secretname' not allowed"),
    "port out of range": ({"tls": {"proxyPort": 0}}, "/tls/proxyPort"),
    "not a certificate": ({"tls": {"cert": "hello"}}, "/tls/cert"),
    "not a key": ({"tls": {"key": "-----BEGIN CERTIFICATE-----"}}, "/tls/key"),
    "secret name": ({"tls": {"secretName": "Bad_Name"}}, "/tls/secretName"),
    "probe period": ({"router": {"readinessProbe": {"periodSeconds": 0}}}, "/router/readinessProbe/periodSeconds"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_ERRORS))
def test_schema_rejects_bad_tls_values(case):
    values, where = SCHEMA_ERRORS[case]
    with pytest.raises(helm.HelmValuesError) as e:
        chart().validate_schema(values)
    assert where in str(e.value), str(e.value)


TEMPLATE_ERRORS = {
    "nothing to serve": ({"tls": {"enabled": True}}, "tls.enabled needs tls.secretName"),
    "cert without key": ({"tls": {"enabled": True, "cert": "-----BEGIN CERTIFICATE-----"}}, "both tls.cert and tls.key"),
    "secret and inline": ({"tls": {"enabled": True, "secretName": "s", "ca": "-----BEGIN CERTIFICATE-----"}},
                          "not both"),
    "client auth without a ca": ({"tls": {"enabled": True, "clientAuth": True, "cert": "-----BEGIN CERTIFICATE-----",
                                          "key": "-----BEGIN PRIVATE KEY-----"}}, "tls.clientAuth needs"),
    "proxy port clash": ({"tls": {"enabled": True, "secretName": "s", "proxyPort": 8000}}, "tls.proxyPort (8000)"),
}


@pytest.mark.parametrize("case", sorted(TEMPLATE_ERRORS))
def test_templates_reject_inconsistent_tls_values(case):
    values, message = TEMPLATE_ERRORS[case]
    chart().validate_schema(values)
    with pytest.raises(helm.HelmRenderError) as e:
        render_values(values)
    assert message in str(e.value), str(e.value)


def test_rendered_commands_are_real_cli_invocations(with_secret, capsys):
    """The probe's exact argv answers 0 against a SERVING health service and 1 against NOT_SERVING;
    the sidecar's argv parses as `dsaserve tls-front`."""
    probe = _container(render("default").pod_templates()["decode"], "ray-worker")["readinessProbe"]["exec"]["command"]
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        argv = [a.replace("127.0.0.1:50051", f"127.0.0.1:{port}") for a in probe[1:]]
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert main(argv) == 0 and capsys.readouterr().out.strip() == "SERVING"
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert main(argv) == 1
    finally:
        server.stop(0)
    front = _container(with_secret.pod_templates()["head"], "tls-front")
    args = build_parser().parse_args(front["command"][1:] + front["args"])
    assert (args.listen, args.upstream, args.tls_client_ca) == ("[::]:50051", "127.0.0.1:50061", f"{TLS_DIR}/ca.crt")
