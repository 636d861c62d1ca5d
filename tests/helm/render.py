"""Render the chart with real Helm (helm-python-sdk embeds Helm v4) into parsed manifests."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "dsaserve"
VALUES = Path(__file__).resolve().parent / "values"
RELEASE, NAMESPACE = "dsaserve", "llm"

# scenario → values file layered on the chart's values.yaml (None: the defaults, a GPU cluster)
SCENARIOS = {
    "default": None,
    "gpu": VALUES / "gpu.yaml",
    "cpu": CHART / "values-cpu.yaml",
    "external-redis": VALUES / "external-redis.yaml",
    "multinode": CHART / "values-multinode.yaml",
}


@dataclass(frozen=True)
class Rendered:
    scenario: str
    values: dict
    docs: tuple[dict, ...]
    notes: str

    def kinds(self) -> set[str]:
        return {d["kind"] for d in self.docs}

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        docs = [d for d in self.of_kind(kind) if name is None or d["metadata"]["name"] == name]
        assert len(docs) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in docs]}"
        return docs[0]

    @property
    def rayservice(self) -> dict:
        return self.one("RayService")

    @property
    def serve_config(self) -> dict:
        return yaml.safe_load(self.rayservice["spec"]["serveConfigV2"])

    @property
    def args(self) -> dict:
        return self.serve_config["applications"][0]["args"]

    def worker_group(self, name: str) -> dict:
        groups = self.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        return next(g for g in groups if g["groupName"] == name)

    def pod_templates(self) -> dict[str, dict]:
        """Every pod template: the Ray head and worker groups, StatefulSets and Deployments."""
        cluster = self.rayservice["spec"]["rayClusterConfig"]
        out = {"head": cluster["headGroupSpec"]["template"]}
        out.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
        for d in self.docs:
            if d["kind"] in ("StatefulSet", "Deployment"):
                out[d["metadata"]["name"]] = d["spec"]["template"]
        return out


@functools.lru_cache(maxsize=None)
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def scenario_values(scenario: str) -> dict:
    path = SCENARIOS[scenario]
    return {} if path is None else yaml.safe_load(path.read_text())


def render_values(values: dict, scenario: str = "custom") -> Rendered:
    out = chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = tuple(d for path, text in sorted(out.items()) if path.endswith(".yaml")
                 for d in yaml.safe_load_all(text) if d)
    notes = next((text for path, text in out.items() if path.endswith("NOTES.txt")), "")
    return Rendered(scenario, values, docs, notes)


@functools.lru_cache(maxsize=None)
def render(scenario: str) -> Rendered:
    return render_values(scenario_values(scenario), scenario)
