"""Kubernetes side of dsaserve, with the ``kubernetes`` client: what ``dsaserve k8s status`` shows and
the planner loop behind ``dsaserve k8s plan``.

Both work on the RayService the Helm chart renders (``helm/dsaserve``). The planner reads the router's
metrics (``router.client.Client.status()`` plus a one-token probe for time to first token), asks
``cluster.k8s_planner.decide`` for replica counts, and patches the RayService; KubeRay then applies the
new Serve config and worker-group sizes. RBAC: the chart's Role (get/list/watch/patch rayservices,
get/list/watch rayclusters and pods).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cluster.k8s_planner import (
    GPU_RESOURCE, ROLES, Decision, Metrics, PlanError, PlannerConfig, build_patch, decide, role_states, serve_app,
)

log = logging.getLogger(__name__)
GROUP, VERSION, PLURAL = "ray.io", "v1", "rayservices"
CHART_SELECTOR = "app.kubernetes.io/part-of=dsaserve"
INSTANCE_LABEL = "app.kubernetes.io/instance"
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
PROBE_PROMPT_IDS = (0,)  # one token (BOS): the probe's TTFT is queueing plus one tiny prefill


class K8sError(RuntimeError):
    """No cluster to talk to, or the API refused: the message says which and what to check."""


def _api_error(e: Exception, what: str) -> K8sError:
    status = getattr(e, "status", None)
    if status == 404:
        return K8sError(f"{what}: not found (is the chart installed in that namespace, and the KubeRay CRDs?)")
    if status in (401, 403):
        return K8sError(f"{what}: not allowed ({status}); the chart's ServiceAccount/Role grants what dsaserve needs")
    return K8sError(f"{what}: {getattr(e, 'reason', None) or e}")


class Kube:
    """The API calls dsaserve makes, on plain dicts (camelCase, as ``kubectl -o json``)."""

    def __init__(self, api_client=None) -> None:
        from kubernetes import client

        self._client = api_client or client.ApiClient()
        self.custom = client.CustomObjectsApi(self._client)
        self.core = client.CoreV1Api(self._client)

    @classmethod
    def connect(cls, context: str | None = None) -> Kube:
        """In-cluster credentials when running in a pod, else the kubeconfig (``context`` picks one)."""
        from kubernetes import config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config(context=context)
            except (config.ConfigException, OSError) as e:
                raise K8sError(f"no Kubernetes credentials: not in a pod and no usable kubeconfig ({e})") from None
        return cls()

    def _call(self, what: str, fn, *args, **kwargs):
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            raise _api_error(e, what) from None
        except OSError as e:  # urllib3 connection errors
            raise K8sError(f"{what}: cannot reach the API server ({e})") from None

    def get_rayservice(self, namespace: str, name: str) -> dict:
        return self._call(f"RayService {namespace}/{name}", self.custom.get_namespaced_custom_object,
                          GROUP, VERSION, namespace, PLURAL, name)

    def list_rayservices(self, namespace: str, selector: str = CHART_SELECTOR) -> list[dict]:
        out = self._call(f"RayServices in {namespace}", self.custom.list_namespaced_custom_object,
                         GROUP, VERSION, namespace, PLURAL, label_selector=selector)
        return out.get("items", [])

    def patch_rayservice(self, namespace: str, name: str, patch: dict) -> dict:
        return self._call(f"patch RayService {namespace}/{name}", self.custom.patch_namespaced_custom_object,
                          GROUP, VERSION, namespace, PLURAL, name, patch,
                          _content_type="application/merge-patch+json")  # lists replace whole (RFC 7386)

    def list_pods(self, namespace: str, selector: str) -> list[dict]:
        pods = self._call(f"pods in {namespace}", self.core.list_namespaced_pod, namespace, label_selector=selector)
        return [self._client.sanitize_for_serialization(p) for p in pods.items]


def default_namespace(context: str | None = None) -> str:
    """The pod's namespace in a cluster, else the kubeconfig context's, else ``default``."""
    if IN_CLUSTER_NAMESPACE.is_file():
        return IN_CLUSTER_NAMESPACE.read_text().strip()
    try:
        from kubernetes import config

        _, current = config.list_kube_config_contexts()
        ctx = current if context is None else next(c for c in config.list_kube_config_contexts()[0] if c["name"] == context)
        return ctx.get("context", {}).get("namespace") or "default"
    except Exception:  # no kubeconfig: the default namespace
        return "default"


def find_rayservice(kube: Kube, namespace: str, name: str | None) -> dict:
    """The named RayService, or the only one the chart installed in the namespace."""
    if name:
        return kube.get_rayservice(namespace, name)
    items = kube.list_rayservices(namespace)
    if len(items) != 1:
        names = ", ".join(i["metadata"]["name"] for i in items) or "none"
        raise K8sError(f"{len(items)} dsaserve RayServices in {namespace} ({names}): name one with --name")
    return items[0]


def pod_selector(rayservice: dict) -> str:
    instance = (rayservice.get("metadata", {}).get("labels") or {}).get(INSTANCE_LABEL)
    if instance:
        return f"{INSTANCE_LABEL}={instance}"
    return f"ray.io/originated-from-cr-name={rayservice['metadata']['name']}"


# ---------------------------------------------------------------------------------------------- status
def _age(timestamp: str | None, now: datetime) -> str:
    if not timestamp:
        return "?"
    s = int((now - datetime.fromisoformat(timestamp.replace("Z", "+00:00"))).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{max(s, 0)}s"


def _pod_row(pod: dict, now: datetime) -> dict:
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    labels = meta.get("labels") or {}
    containers = status.get("containerStatuses") or []
    gpus = sum(int(float((c.get("resources", {}).get("limits") or {}).get(GPU_RESOURCE, 0)))
               for c in spec.get("containers", []))
    phase = status.get("phase", "Unknown")
    waiting = [c["state"]["waiting"].get("reason") for c in containers if (c.get("state") or {}).get("waiting")]
    return {
        "name": meta.get("name", "?"),
        "component": labels.get("app.kubernetes.io/component") or labels.get("ray.io/group") or "?",
        "ready": f"{sum(1 for c in containers if c.get('ready'))}/{len(spec.get('containers', []))}",
        "status": waiting[0] if waiting and waiting[0] else ("Terminating" if meta.get("deletionTimestamp") else phase),
        "restarts": sum(c.get("restartCount", 0) for c in containers),
        "gpus": gpus,
        "node": spec.get("nodeName") or "-",
        "age": _age(meta.get("creationTimestamp"), now),
    }


def summarize(rayservice: dict, pods: list[dict], router: dict | None = None, now: datetime | None = None) -> dict:
    """The at-a-glance view (JSON-able): service state, Serve applications and deployments, clusters, pods."""
    now = now or datetime.now(timezone.utc)
    status = rayservice.get("status") or {}
    conditions = {c["type"]: c for c in status.get("conditions", [])}
    ready = conditions.get("Ready", {})
    clusters = []
    for which in ("activeServiceStatus", "pendingServiceStatus"):
        s = status.get(which) or {}
        if not s.get("rayClusterName"):
            continue
        rc = s.get("rayClusterStatus") or {}
        apps = {name: {"status": a.get("status", "?"), "message": a.get("message", ""),
                       "deployments": {d: v.get("status", "?") for d, v in (a.get("serveDeploymentStatuses") or {}).items()}}
                for name, a in (s.get("applicationStatuses") or {}).items()}
        clusters.append({"role": which.removesuffix("ServiceStatus"), "name": s["rayClusterName"], "state": rc.get("state", "?"),
                         "workers_ready": rc.get("readyWorkerReplicas", rc.get("availableWorkerReplicas", 0)),
                         "workers_desired": rc.get("desiredWorkerReplicas", 0), "applications": apps})
    try:
        replicas = {r: s.replicas for r, s in role_states(rayservice).items()}
    except (PlanError, KeyError, TypeError, ValueError):
        replicas = {}
    meta = rayservice.get("metadata", {})
    out = {
        "rayservice": f"{meta.get('namespace', '?')}/{meta.get('name', '?')}",
        "service_status": status.get("serviceStatus") or ("Running" if ready.get("status") == "True" else "NotReady"),
        "ready": ready.get("status", "Unknown"), "reason": ready.get("reason", ""),
        "upgrading": conditions.get("UpgradeInProgress", {}).get("status") == "True",
        "serve_endpoints": status.get("numServeEndpoints", 0),
        "replicas": replicas,
        "clusters": clusters,
        "pods": sorted((_pod_row(p, now) for p in pods), key=lambda r: (r["component"], r["name"])),
    }
    if router is not None:
        m = Metrics.from_status(router)
        out["router"] = {"queue_depth": m.queue_depth,
                         **{r: {"replicas": getattr(m, r).replicas, "running": getattr(m, r).running,
                                "waiting": getattr(m, r).waiting, "kv_used": round(getattr(m, r).kv_used, 3)} for r in ROLES}}
    return out


def format_status(s: dict) -> str:
    lines = [f"RayService {s['rayservice']}  {s['service_status']}  ready={s['ready']}"
             + (f" ({s['reason']})" if s["reason"] else "") + f"  serve endpoints {s['serve_endpoints']}"
             + ("  UPGRADING" if s["upgrading"] else "")]
    if s["replicas"]:
        lines.append("replicas  " + "  ".join(f"{r} {n}" for r, n in s["replicas"].items()))
    for c in s["clusters"]:
        lines.append(f"{c['role']} cluster {c['name']}  {c['state']}  workers {c['workers_ready']}/{c['workers_desired']} ready")
        for name, app in c["applications"].items():
            lines.append(f"  app {name}  {app['status']}" + (f"  {app['message'][:120]}" if app["message"] else ""))
            lines += [f"    {d:<10} {st}" for d, st in sorted(app["deployments"].items())]
    if "router" in s:
        r = s["router"]
        lines.append(f"router  queue depth {r['queue_depth']}  " + "  ".join(
            f"{k}: {r[k]['replicas']} up, {r[k]['running']} running, {r[k]['waiting']} waiting, KV {r[k]['kv_used']:.0%}"
            for k in ROLES))
    header = ("NAME", "COMPONENT", "READY", "STATUS", "RESTARTS", "GPUS", "NODE", "AGE")
    rows = [header] + [tuple(str(p[k]) for k in ("name", "component", "ready", "status", "restarts", "gpus", "node", "age"))
                       for p in s["pods"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines.append("pods" if s["pods"] else "pods: none")
    if s["pods"]:
        lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- planner
def _probe_ttft_ms(client) -> float:
    """Time to first token as a client sees it (admission and queueing included), one token's request."""
    start = time.monotonic()
    for delta in client.generate_stream(prompt_ids=list(PROBE_PROMPT_IDS), max_tokens=1, ignore_eos=True):
        if delta.token_ids:
            return (time.monotonic() - start) * 1000.0
        if delta.finished:
            break
    raise K8sError("the TTFT probe finished without a token")


def router_metrics(address: str, *, probe: bool = True, timeout_s: float = 10.0) -> Callable[[], Metrics]:
    """A metrics source over the router's gRPC API: status for load, a one-token request for TTFT."""
    from router.client import Client, DsaServeError

    def read() -> Metrics:
        with Client(address, timeout=timeout_s) as client:
            status = client.status()
            ttft = None
            if probe:
                try:
                    ttft = _probe_ttft_ms(client)
                except DsaServeError as e:  # an overloaded router answers RESOURCE_EXHAUSTED: that is slow too
                    log.warning("TTFT probe failed: %s", e)
                    ttft = timeout_s * 1000.0 if e.code.name in ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED") else None
        return Metrics.from_status(status, ttft)

    return read


@dataclass(frozen=True)
class Step:
    decision: Decision
    patched: bool
    patch: dict | None = None


class Planner:
    """One RayService, one metrics source; ``step()`` observes, decides and patches once."""

    def __init__(self, kube: Kube, namespace: str, name: str, config: PlannerConfig, metrics: Callable[[], Metrics], *,
                 app_name: str | None = None, dry_run: bool = False, clock: Callable[[], float] = time.time) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name
        self.config, self.metrics, self.app_name = config, metrics, app_name
        self.dry_run, self.clock = dry_run, clock

    def step(self) -> Step:
        rayservice = self.kube.get_rayservice(self.namespace, self.name)
        serve_app(rayservice, self.app_name)  # fail early on a RayService the chart did not render
        states = role_states(rayservice, self.app_name)
        now = self.clock()
        decision = decide(self.config, states, self.metrics(), now)
        for reason in decision.reasons:
            log.info("%s/%s: %s", self.namespace, self.name, reason)
        if all(decision.replicas(r) == states[r].replicas for r in ROLES):
            return Step(decision, False)
        patch = build_patch(rayservice, decision, now, self.app_name)
        if not self.dry_run:
            self.kube.patch_rayservice(self.namespace, self.name, patch)
            log.info("%s/%s: prefill %d -> %d, decode %d -> %d", self.namespace, self.name, states["prefill"].replicas,
                     decision.prefill, states["decode"].replicas, decision.decode)
        return Step(decision, not self.dry_run, patch)

    def run(self, interval_s: float, stop: threading.Event) -> None:
        """Step every ``interval_s`` until ``stop``; a failed step (router down, 409) is logged and retried."""
        while not stop.is_set():
            try:
                self.step()
            except (K8sError, PlanError) as e:
                log.warning("planner step failed: %s", e)
            except Exception as e:  # the router is unreachable, a probe timed out: observe again later
                log.warning("planner step failed: %s: %s", type(e).__name__, e)
            stop.wait(interval_s)
