"""The rendered manifests against the real schemas: Helm's strict lint, Kubernetes 1.30 and 1.33
(kubernetes-validate, strict: unknown fields are errors), and the KubeRay RayService CRD."""

from __future__ import annotations

import pytest
import kubernetes_validate
import helm_python as helm

from tests.helm.render import CHART, SCENARIOS, render, scenario_values
from tests.k8s.crd import crd_errors

KUBE_VERSIONS = ("1.30.0", "1.33.0")
CUSTOM_KINDS = {"RayService", "ServiceMonitor"}  # not in Kubernetes' own schemas


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_lint_strict(scenario, kube_version):
    result = helm.lint(CHART, scenario_values(scenario), strict=True, kube_version=f"v{kube_version}")
    problems = [m for m in result["messages"] if m["severity"] >= 2]  # warnings and errors (info: "icon is recommended")
    assert not result["errors"] and not problems, problems or result["errors"]


def _validate(doc: dict, version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{doc['kind']} {doc['metadata']['name']} on Kubernetes {version}: "
                    f"{'.'.join(str(p) for p in e.path)}: {e.message}")


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_core_manifests_validate_against_kubernetes(scenario):
    rendered = render(scenario)
    docs = [d for d in rendered.docs if d["kind"] not in CUSTOM_KINDS]
    assert len(docs) >= 8
    for version in KUBE_VERSIONS:
        for doc in docs:
            _validate(doc, version)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_ray_pod_templates_validate_against_kubernetes(scenario):
    """The head and worker pod templates inside the RayService, as core PodTemplates (stricter than the CRD)."""
    rendered = render(scenario)
    for name in ("head", "prefill", "decode"):
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
               "template": rendered.pod_templates()[name]}
        for version in KUBE_VERSIONS:
            _validate(doc, version)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rayservice_validates_against_the_kuberay_crd(scenario):
    errors = crd_errors(render(scenario).rayservice)
    assert not errors, "\n".join(errors[:10])


def test_crd_check_catches_mistakes():
    """The CRD check is not vacuous: a misspelled field and a wrong type are caught."""
    rs = render("default").rayservice
    bad = {**rs, "spec": {**rs["spec"], "serveConfigv2": "x"}}
    assert any("serveConfigv2" in e for e in crd_errors(bad))
    groups = [dict(g, replicas="two") for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    bad = {**rs, "spec": {**rs["spec"], "rayClusterConfig": {**rs["spec"]["rayClusterConfig"], "workerGroupSpecs": groups}}}
    assert any("replicas" in e for e in crd_errors(bad))
