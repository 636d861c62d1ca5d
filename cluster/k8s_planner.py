"""The planner's decisions, without I/O: how many prefill and decode replicas the workload calls for,
and the RayService patch that applies them.

Prefill answers for time to first token: it grows when TTFT passes the target or prompts queue on the
prefill workers, and shrinks when TTFT is well under target with nothing waiting. Decode answers for
the running batch: it grows when its sequence slots or KV blocks near full (or the router holds more
requests than decode can run), and shrinks when a replica fewer would still be comfortably loaded.
Every change stays within min/max, waits out a cooldown per kind (longer before shrinking), and, under
a GPU budget, one kind gives a replica to the other so the prefill:decode ratio follows the workload.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import yaml

from cluster.config import WorkerGroupConfig
from workers.engine.types import WorkerStats

ROLES = ("prefill", "decode")
APP_IMPORT_PATH = "cluster.app:app_builder"
CHANGED_AT_ANNOTATION = "dsaserve.io/planner-{role}-changed-at"
RANKS_PER_POD_ANNOTATION = "dsaserve.io/ranks-per-pod"
GPU_RESOURCE = "nvidia.com/gpu"


class PlanError(ValueError):
    """The RayService does not look like one the chart rendered (no app, no worker group)."""


@dataclass(frozen=True)
class RoleLoad:
    """What the workers of one kind report, summed over the replicas that report."""

    replicas: int = 0
    waiting: int = 0
    running: int = 0
    free_blocks: int = 0
    total_blocks: int = 0

    @property
    def kv_used(self) -> float:
        return 0.0 if self.total_blocks == 0 else 1.0 - self.free_blocks / self.total_blocks


@dataclass(frozen=True)
class Metrics:
    """One observation: the router's requests in flight (its queue depth), per-kind worker load, and a
    probe request's time to first token (None when not measured)."""

    queue_depth: int
    prefill: RoleLoad
    decode: RoleLoad
    ttft_ms: float | None = None

    @classmethod
    def from_status(cls, status: dict, ttft_ms: float | None = None) -> Metrics:
        """From ``router.client.Client.status()`` (the ``Status`` reply as JSON); unhealthy workers do not count."""
        workers = [WorkerStats.from_json(w) for w in status["workers"]]
        loads = {}
        for role in ROLES:
            ws = [w for w in workers if w.role == role and w.healthy]
            loads[role] = RoleLoad(len(ws), sum(w.waiting for w in ws), sum(w.running for w in ws),
                                   sum(w.free_blocks for w in ws), sum(w.total_blocks for w in ws))
        return cls(status["router"]["in_flight"], loads["prefill"], loads["decode"], ttft_ms)


@dataclass(frozen=True)
class Bounds:
    min_replicas: int
    max_replicas: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"replica bounds need 1 <= min <= max, got {self.min_replicas}:{self.max_replicas}")

    def clamp(self, n: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, n))


@dataclass(frozen=True)
class PlannerConfig:
    """Targets and limits. Thresholds are fractions of capacity unless named otherwise."""

    prefill: Bounds = field(default_factory=lambda: Bounds(1, 4))
    decode: Bounds = field(default_factory=lambda: Bounds(1, 4))
    target_ttft_ms: float = 2000.0
    ttft_low: float = 0.5             # TTFT under target × this lets prefill shrink
    prefill_queue_high: float = 2.0   # prompts waiting per prefill replica that call for another
    decode_load_high: float = 0.85    # decode slots or KV blocks in use above which decode grows
    decode_load_low: float = 0.30     # ... below which (with one replica fewer still under high) it shrinks
    cooldown_s: float = 120.0         # after a change of a kind, before it grows again
    scale_down_cooldown_s: float = 600.0
    max_step: int = 2                 # most replicas added at once
    max_total_gpus: int | None = None

    def bounds(self, role: str) -> Bounds:
        return self.prefill if role == "prefill" else self.decode


@dataclass(frozen=True)
class RoleState:
    """A kind as deployed: Serve replicas, when the planner last changed them, and its shape."""

    replicas: int
    changed_at: float | None = None
    gpus_per_replica: float = 0.0     # ep_size × num_gpus
    max_num_seqs: int = 64
    ep_size: int = 1
    ranks_per_pod: int = 1

    def pods_for(self, replicas: int) -> int:
        return pods_for(replicas, self.ep_size, self.ranks_per_pod)


@dataclass(frozen=True)
class Decision:
    prefill: int
    decode: int
    reasons: tuple[str, ...]

    def replicas(self, role: str) -> int:
        return self.prefill if role == "prefill" else self.decode


def pods_for(replicas: int, ep_size: int, ranks_per_pod: int) -> int:
    """Worker pods that hold ``replicas`` × ``ep_size`` ranks, ``ranks_per_pod`` to a pod (as the chart)."""
    return math.ceil(replicas * ep_size / ranks_per_pod)


@dataclass
class _Want:
    replicas: int
    pressure: float  # > 1: wants more; < 1: has room
    can_give: bool   # one replica fewer would stay under the high mark
    reason: str = ""
    trimmed: bool = False  # growth cut by the GPU budget


def _prefill(cfg: PlannerConfig, st: RoleState, m: Metrics) -> _Want:
    n, load = st.replicas, m.prefill
    queue = load.waiting / n / cfg.prefill_queue_high
    ttft = 0.0 if m.ttft_ms is None else m.ttft_ms / cfg.target_ttft_ms
    pressure = max(queue, ttft)
    if load.replicas < n:
        return _Want(n, pressure, False, f"prefill: {load.replicas} of {n} replicas report; waiting for the rest")
    if pressure > 1:
        step = min(cfg.max_step, max(1, math.ceil(n * (pressure - 1))))
        why = f"TTFT {m.ttft_ms:.0f} ms > target {cfg.target_ttft_ms:.0f} ms" if ttft >= queue else \
            f"{load.waiting} prompts waiting on {n} prefill replicas"
        return _Want(n + step, pressure, False, f"prefill +{step}: {why}")
    idle = load.waiting == 0 and (ttft < cfg.ttft_low if m.ttft_ms is not None else load.running == 0 and m.queue_depth == 0)
    if idle and n > 1:
        why = f"TTFT {m.ttft_ms:.0f} ms < {cfg.ttft_low:g} × target" if m.ttft_ms is not None else "idle"
        return _Want(n - 1, pressure, True, f"prefill -1: {why}")
    return _Want(n, pressure, idle and n > 1)


def _decode(cfg: PlannerConfig, st: RoleState, m: Metrics) -> _Want:
    n, load = st.replicas, m.decode
    slots = n * st.max_num_seqs
    demand = max(load.running + load.waiting, m.queue_depth) / slots
    used = max(demand, load.kv_used)
    pressure = used / cfg.decode_load_high
    if load.replicas < n:
        return _Want(n, pressure, False, f"decode: {load.replicas} of {n} replicas report; waiting for the rest")
    can_give = n > 1 and load.waiting == 0 and used * n / (n - 1) < cfg.decode_load_high
    if pressure > 1:
        step = min(cfg.max_step, max(1, math.ceil(n * (pressure - 1))))
        what = "KV blocks" if load.kv_used >= demand else "sequence slots"
        return _Want(n + step, pressure, False, f"decode +{step}: {what} {used:.0%} used (high {cfg.decode_load_high:.0%})")
    if used < cfg.decode_load_low and can_give:
        return _Want(n - 1, pressure, True, f"decode -1: {used:.0%} used (low {cfg.decode_load_low:.0%})")
    return _Want(n, pressure, can_give)


def decide(cfg: PlannerConfig, state: dict[str, RoleState], metrics: Metrics, now: float) -> Decision:
    """The replica counts to run next. ``state`` maps "prefill" and "decode" to their RoleState."""
    wants = {"prefill": _prefill(cfg, state["prefill"], metrics), "decode": _decode(cfg, state["decode"], metrics)}
    reasons = []
    for role, w in wants.items():
        st, bounds = state[role], cfg.bounds(role)
        target = bounds.clamp(w.replicas)
        if target != w.replicas and w.reason:
            w.reason += f" (held to {target} by {role} bounds {bounds.min_replicas}..{bounds.max_replicas})"
        elif target != w.replicas:
            w.reason = f"{role} {st.replicas} -> {target}: outside bounds {bounds.min_replicas}..{bounds.max_replicas}"
        since = math.inf if st.changed_at is None else now - st.changed_at
        wait = cfg.cooldown_s if target > st.replicas else cfg.scale_down_cooldown_s
        if target != st.replicas and since < wait:
            w.reason += f" (cooling down: {since:.0f} of {wait:.0f} s)"
            target = st.replicas
        w.can_give = w.can_give and since >= cfg.scale_down_cooldown_s and st.replicas > bounds.min_replicas
        w.replicas = target
        if w.reason:
            reasons.append(w.reason)
    if cfg.max_total_gpus is not None:
        reasons += _fit_budget(cfg, state, wants)
    return Decision(wants["prefill"].replicas, wants["decode"].replicas, tuple(reasons))


def _fit_budget(cfg: PlannerConfig, state: dict[str, RoleState], wants: dict[str, _Want]) -> list[str]:
    """Trim growth to the GPU budget; where a kind under pressure is held by the budget and the other
    can give a replica, move one over. A deployment already over the budget is not shrunk for it."""
    budget = cfg.max_total_gpus
    gpus = lambda: sum(wants[r].replicas * state[r].gpus_per_replica for r in ROLES)  # noqa: E731
    notes = []
    by_pressure = sorted(ROLES, key=lambda r: wants[r].pressure)
    for role in by_pressure:  # the least pressed kind gives up its growth first
        while gpus() > budget and wants[role].replicas > min(state[role].replicas, cfg.bounds(role).max_replicas):
            wants[role].replicas -= 1
            wants[role].trimmed = True
            notes.append(f"{role}: growth held by the GPU budget ({budget})")
    for role in reversed(by_pressure):  # the most pressed kind may take a replica from the other
        other = "decode" if role == "prefill" else "prefill"
        w, o = wants[role], wants[other]
        held = w.trimmed and w.replicas == state[role].replicas
        if held and o.can_give and o.replicas == state[other].replicas:
            o.replicas -= 1
            w.replicas += 1
            if gpus() <= budget:
                notes.append(f"{other} -1, {role} +1: the GPU budget ({budget}) is full and {role} is the busier kind")
                break
            o.replicas += 1
            w.replicas -= 1
    return list(dict.fromkeys(notes))


# ---------------------------------------------------------------------------------------------- RayService
def serve_app(rayservice: dict, app_name: str | None = None) -> tuple[dict, dict]:
    """(the whole Serve config, the dsaserve application in it) from a RayService's serveConfigV2."""
    text = rayservice.get("spec", {}).get("serveConfigV2")
    if not text:
        raise PlanError("the RayService has no serveConfigV2")
    serve = yaml.safe_load(text)
    for app in serve.get("applications", []):
        if (app_name is None and app.get("import_path") == APP_IMPORT_PATH) or app.get("name") == app_name:
            return serve, app
    raise PlanError(f"no Serve application {app_name or APP_IMPORT_PATH!r} in serveConfigV2")


def worker_group(rayservice: dict, role: str) -> dict:
    for group in rayservice["spec"]["rayClusterConfig"].get("workerGroupSpecs", []):
        if group.get("groupName") == role:
            return group
    raise PlanError(f"the RayService has no worker group named {role!r}")


def role_states(rayservice: dict, app_name: str | None = None) -> dict[str, RoleState]:
    """Each kind's replicas (serveConfigV2 args), shape (args + worker group) and last planner change."""
    _, app = serve_app(rayservice, app_name)
    args = app.get("args", {})
    annotations = rayservice.get("metadata", {}).get("annotations") or {}
    defaults = WorkerGroupConfig()
    states = {}
    for role in ROLES:
        a = args.get(role, {})
        num_gpus = float(a.get("num_gpus", defaults.num_gpus))
        ep = int(a.get("ep_size", 1))
        template = worker_group(rayservice, role)["template"]
        rpp = (template.get("metadata", {}).get("annotations") or {}).get(RANKS_PER_POD_ANNOTATION)
        if rpp is None:  # not rendered by the chart: GPUs of the pod / GPUs per rank
            limits = template["spec"]["containers"][0].get("resources", {}).get("limits", {})
            rpp = int(float(limits.get(GPU_RESOURCE, 0)) // num_gpus) if num_gpus else 1
        changed = annotations.get(CHANGED_AT_ANNOTATION.format(role=role))
        states[role] = RoleState(
            replicas=int(a.get("replicas", defaults.replicas)), changed_at=float(changed) if changed else None,
            gpus_per_replica=ep * num_gpus, max_num_seqs=int(a.get("max_num_seqs", defaults.max_num_seqs)),
            ep_size=ep, ranks_per_pod=max(1, int(rpp)),
        )
    return states


def build_patch(rayservice: dict, decision: Decision, now: float, app_name: str | None = None) -> dict:
    """A JSON merge patch (RFC 7386) that sets both kinds' Serve replicas in serveConfigV2 and, unless
    Ray's autoscaler sizes the cluster, their worker groups' pod counts; it records when each kind
    changed (cooldowns survive planner restarts) and carries the resourceVersion it was computed from,
    so a concurrent edit makes the API server refuse it (409) instead of losing that edit."""
    from kubernetes.client import ApiClient, V1ObjectMeta

    serve, app = serve_app(rayservice, app_name)
    states = role_states(rayservice, app_name)
    annotations = {}
    for role in ROLES:
        n = decision.replicas(role)
        app.setdefault("args", {}).setdefault(role, {})["replicas"] = n
        if n != states[role].replicas:
            annotations[CHANGED_AT_ANNOTATION.format(role=role)] = f"{now:.0f}"
    cluster = rayservice["spec"]["rayClusterConfig"]
    spec: dict = {"serveConfigV2": yaml.safe_dump(serve, sort_keys=False)}
    if not cluster.get("enableInTreeAutoscaling", False):
        groups = copy.deepcopy(cluster.get("workerGroupSpecs", []))  # a merge patch replaces lists whole
        for group in groups:
            role = group.get("groupName")
            if role in ROLES:
                pods = states[role].pods_for(decision.replicas(role))
                group["replicas"] = pods
                group["minReplicas"] = min(int(group.get("minReplicas", pods)), pods)
                group["maxReplicas"] = max(int(group.get("maxReplicas", pods)), pods)
        spec["rayClusterConfig"] = {"workerGroupSpecs": groups}
    meta = V1ObjectMeta(annotations=annotations or None,
                        resource_version=rayservice.get("metadata", {}).get("resourceVersion"))
    return {"metadata": ApiClient().sanitize_for_serialization(meta), "spec": spec}


def merge_patch(target: dict, patch: dict) -> dict:
    """RFC 7386 JSON merge patch, as the API server applies ``application/merge-patch+json``."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key, {}), value)
    return out
