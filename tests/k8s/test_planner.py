"""The planner's decisions under synthetic metrics, and the RayService patch that applies them."""

from __future__ import annotations

import copy

import pytest
import yaml

from cluster.config import ClusterConfig
from cluster.k8s import Planner
from cluster.k8s_planner import (
    CHANGED_AT_ANNOTATION, Bounds, Decision, Metrics, PlanError, PlannerConfig, RoleLoad, RoleState, build_patch,
    decide, merge_patch, role_states,
)
from tests.helm.render import render, render_values
from tests.k8s.crd import crd_available, crd_errors
from workers.engine.types import WorkerStats

T0 = 100_000.0
CFG = PlannerConfig(prefill=Bounds(1, 4), decode=Bounds(1, 4), target_ttft_ms=1000, cooldown_s=60,
                    scale_down_cooldown_s=300, max_step=2)


def state(prefill=2, decode=2, changed_at=None, gpus=1.0, seqs=32):
    return {"prefill": RoleState(prefill, changed_at, gpus, seqs), "decode": RoleState(decode, changed_at, gpus, seqs)}


def load(replicas, waiting=0, running=0, used=0.0, blocks=1000):
    return RoleLoad(replicas, waiting, running, int(blocks * (1 - used)), blocks)


def metrics(st, *, ttft=500.0, queue=None, pw=0, pr=1, dw=0, dr=None, kv=0.3):
    p, d = st["prefill"].replicas, st["decode"].replicas
    dr = d * 16 if dr is None else dr  # half of the decode slots by default: steady
    return Metrics(queue_depth=dr + pw + pr if queue is None else queue, prefill=load(p, pw, pr),
                   decode=load(d, dw, dr, kv), ttft_ms=ttft)


def test_steady_load_changes_nothing():
    st = state()
    d = decide(CFG, st, metrics(st), T0)
    assert (d.prefill, d.decode, d.reasons) == (2, 2, ())


def test_ttft_over_target_grows_prefill_in_proportion():
    st = state()
    assert decide(CFG, st, metrics(st, ttft=1300), T0).prefill == 3     # 30% over: one more
    d = decide(CFG, st, metrics(st, ttft=5000), T0)                      # 5x over: capped at max_step
    assert d.prefill == 4 and "TTFT 5000 ms > target 1000 ms" in d.reasons[0]
    assert d.decode == 2


def test_prompts_queued_on_prefill_grow_it_without_a_ttft():
    st = state()
    d = decide(CFG, st, metrics(st, ttft=None, pw=10), T0)
    assert d.prefill == 4 and "10 prompts waiting" in d.reasons[0]


def test_fast_ttft_and_nothing_waiting_shrink_prefill():
    st = state(prefill=3)
    assert decide(CFG, st, metrics(st, ttft=200), T0).prefill == 2
    assert decide(CFG, st, metrics(st, ttft=700), T0).prefill == 3       # between low and target: hold
    assert decide(CFG, st, metrics(st, ttft=200, pw=1), T0).prefill == 3  # something waiting: hold
    idle = Metrics(0, load(3), load(2), None)                            # no probe, nothing running: idle
    assert decide(CFG, st, idle, T0).prefill == 2


def test_full_decode_slots_or_kv_grow_decode():
    st = state()
    assert decide(CFG, st, metrics(st, dr=60), T0).decode == 3           # 60/64 slots
    d = decide(CFG, st, metrics(st, kv=0.95), T0)                        # KV blocks nearly gone
    assert d.decode == 3 and "KV blocks 95% used" in d.reasons[0]
    assert decide(CFG, st, metrics(st, dr=30, queue=200), T0).decode == 4  # router holds 200 for 64 slots


def test_decode_shrinks_only_when_one_fewer_stays_under_the_high_mark():
    st = state(decode=3)
    assert decide(CFG, st, metrics(st, dr=10, kv=0.1, queue=10), T0).decode == 2
    assert decide(CFG, st, metrics(st, dr=10, kv=0.1, queue=10, dw=1), T0).decode == 3
    two = state(decode=2)
    assert decide(CFG, two, metrics(two, dr=18, kv=0.25, queue=18), T0).decode == 1   # 28% of 2 = 56% of 1
    assert decide(CFG, two, metrics(two, dr=24, kv=0.25, queue=24), T0).decode == 2   # 38%: above the low mark


def test_bounds_hold():
    st = state(prefill=4, decode=1)
    d = decide(CFG, st, metrics(st, ttft=9000, dr=5, kv=0.05, queue=5), T0)
    assert d.prefill == 4 and "held to 4 by prefill bounds 1..4" in d.reasons[0]
    assert d.decode == 1  # the minimum
    outside = state(prefill=6, decode=2)  # bounds tightened since the last change
    d = decide(CFG, outside, metrics(outside), T0)
    assert d.prefill == 4 and "prefill 6 -> 4: outside bounds 1..4" in d.reasons
    with pytest.raises(ValueError):
        Bounds(3, 2)


def test_cooldowns_hold_changes_then_let_them_through():
    st = state(changed_at=T0)
    d = decide(CFG, st, metrics(st, ttft=1300), T0 + 30)
    assert d.prefill == 2 and "cooling down: 30 of 60 s" in d.reasons[0]
    assert decide(CFG, st, metrics(st, ttft=1300), T0 + 61).prefill == 3
    shrink = state(prefill=3, changed_at=T0)
    assert decide(CFG, shrink, metrics(shrink, ttft=100), T0 + 200).prefill == 3   # shrinking waits longer
    assert decide(CFG, shrink, metrics(shrink, ttft=100), T0 + 301).prefill == 2


def test_replicas_still_starting_hold_growth():
    st = state(prefill=3)
    m = Metrics(10, load(2, waiting=20), load(2, running=16), 5000.0)
    d = decide(CFG, st, m, T0)
    assert d.prefill == 3 and "2 of 3 replicas report" in d.reasons[0]


def test_unhealthy_workers_do_not_count():
    workers = [
        WorkerStats("p0", "prefill", waiting=3, running=1, free_blocks=10, total_blocks=20),
        WorkerStats("p1", "prefill", waiting=9, running=9, free_blocks=0, total_blocks=20, healthy=False),
        WorkerStats("d0", "decode", waiting=0, running=5, free_blocks=50, total_blocks=100),
    ]
    status = {"mode": "cluster", "router": {"requests_total": 30, "in_flight": 7, "errors_total": 0},
              "workers": [w.to_json() for w in workers]}  # as ``Client.status()`` returns it
    m = Metrics.from_status(status, ttft_ms=42.0)
    assert m.queue_depth == 7 and m.ttft_ms == 42.0
    assert m.prefill == RoleLoad(1, 3, 1, 10, 20)
    assert m.decode.replicas == 1 and m.decode.kv_used == pytest.approx(0.5)


def test_gpu_budget_trims_growth_and_moves_a_replica_to_the_busier_kind():
    cfg = PlannerConfig(prefill=Bounds(1, 4), decode=Bounds(1, 4), target_ttft_ms=1000, max_total_gpus=7,
                        cooldown_s=0, scale_down_cooldown_s=0)
    st = state(prefill=3, decode=3, gpus=1.0)  # both want 4: 8 GPUs of 7; decode is the less pressed
    both = decide(cfg, st, metrics(st, ttft=3000, dr=96, kv=0.99, queue=200), T0)
    assert (both.prefill, both.decode) == (4, 3) and "decode: growth held by the GPU budget (7)" in both.reasons
    cfg = PlannerConfig(prefill=Bounds(1, 4), decode=Bounds(1, 4), target_ttft_ms=1000, max_total_gpus=8,
                        cooldown_s=0, scale_down_cooldown_s=0)
    full = state(prefill=2, decode=2, gpus=2.0)  # 8 of 8 GPUs
    d = decide(cfg, full, metrics(full, ttft=3000, dr=26, kv=0.05, queue=26), T0)  # decode 41% used: not idle
    assert (d.prefill, d.decode) == (3, 1)                                           # ... but 81% on one is fine
    assert any("decode -1, prefill +1" in r for r in d.reasons)
    alone = decide(cfg, full, metrics(full, ttft=3000, dr=8, kv=0.05, queue=8), T0)  # decode idle: shrinks anyway
    assert (alone.prefill, alone.decode) == (3, 1) and "decode -1: 12% used (low 30%)" in alone.reasons
    busy = decide(cfg, full, metrics(full, ttft=3000, dr=60, kv=0.9), T0)  # decode can't give: stay
    assert (busy.prefill, busy.decode) == (2, 2)


def test_ratio_follows_a_shifting_workload():
    """Long prompts, then short prompts with long outputs: prefill grows, then decode takes over."""
    cfg = PlannerConfig(prefill=Bounds(1, 6), decode=Bounds(1, 6), target_ttft_ms=1000, cooldown_s=60,
                        scale_down_cooldown_s=120, max_total_gpus=8)
    replicas, changed = {"prefill": 2, "decode": 2}, {"prefill": None, "decode": None}
    history = []
    for minute in range(30):
        now = T0 + 60 * minute
        st = {r: RoleState(replicas[r], changed[r], 1.0, 32) for r in replicas}
        if minute < 12:  # document QA: 30k-token prompts, short answers
            m = Metrics(40, load(replicas["prefill"], waiting=max(0, 12 - 2 * replicas["prefill"])),
                        load(replicas["decode"], running=6), 400.0 * 12 / replicas["prefill"])
        else:            # chat with long answers: short prompts, many concurrent decodes
            m = Metrics(150, load(replicas["prefill"]), load(replicas["decode"], running=min(150, 32 * replicas["decode"]),
                                                           waiting=max(0, 150 - 32 * replicas["decode"]),
                                                           used=0.9), 150.0)
        d = decide(cfg, st, m, now)
        for r in replicas:
            if d.replicas(r) != replicas[r]:
                replicas[r], changed[r] = d.replicas(r), now
        history.append((replicas["prefill"], replicas["decode"]))
    assert history[11][0] > history[11][1]      # prefill-heavy phase: more prefill than decode
    assert history[-1][1] > history[-1][0]      # decode-heavy phase: more decode than prefill
    assert all(p + d <= 8 for p, d in history)  # the budget held throughout


# ---------------------------------------------------------------------------------------------- patch
def _apply(rs, patch):
    merged = merge_patch(rs, patch)
    merged["metadata"].pop("resourceVersion", None)
    return merged


@pytest.fixture
def rayservice():
    rs = copy.deepcopy(render("multinode").rayservice)
    rs["metadata"].update(namespace="llm", resourceVersion="4711")
    return rs


def test_role_states_read_what_the_chart_rendered(rayservice):
    st = role_states(rayservice)
    assert st["prefill"] == RoleState(replicas=1, changed_at=None, gpus_per_replica=16.0, max_num_seqs=64,
                                      ep_size=16, ranks_per_pod=8)
    assert st["decode"].max_num_seqs == 256


def test_patch_sets_serve_replicas_and_worker_pods_and_validates_against_the_crd(rayservice):
    patch = build_patch(rayservice, Decision(prefill=2, decode=3, reasons=()), now=T0)
    assert patch["metadata"]["resourceVersion"] == "4711"  # optimistic concurrency: a stale patch gets 409
    assert patch["metadata"]["annotations"] == {CHANGED_AT_ANNOTATION.format(role="prefill"): "100000",
                                                CHANGED_AT_ANNOTATION.format(role="decode"): "100000"}
    merged = _apply(rayservice, patch)
    args = yaml.safe_load(merged["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert (args["prefill"]["replicas"], args["decode"]["replicas"]) == (2, 3)
    ClusterConfig.model_validate(args)
    groups = {g["groupName"]: g for g in merged["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert groups["prefill"]["replicas"] == 4 and groups["decode"]["replicas"] == 6   # 16 ranks, 8 to a pod
    assert groups["decode"]["maxReplicas"] >= 6 and groups["prefill"]["minReplicas"] <= 4
    # Everything else is untouched: the pod templates and the rest of the Serve config.
    assert groups["prefill"]["template"] == rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
    before = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    after = yaml.safe_load(merged["spec"]["serveConfigV2"])
    before["applications"][0]["args"]["prefill"]["replicas"] = 2
    before["applications"][0]["args"]["decode"]["replicas"] = 3
    assert after == before
    role = role_states(merged)
    assert (role["prefill"].replicas, role["prefill"].changed_at) == (2, T0)


@pytest.mark.parametrize("scenario", ["default", "gpu", "multinode"])
def test_patched_rayservice_validates_against_the_kuberay_crd(scenario):
    rs = copy.deepcopy(render(scenario).rayservice)
    rs["metadata"]["resourceVersion"] = "1"
    patch = build_patch(rs, Decision(prefill=3, decode=2, reasons=()), now=T0)
    errors = crd_errors(_apply(rs, patch))
    assert not errors, errors[:5]
    assert not crd_errors({"apiVersion": "ray.io/v1", "kind": "RayService", **patch}, partial=True)  # the body alone


def test_patch_leaves_worker_groups_to_rays_autoscaler():
    rs = render("gpu").rayservice
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    patch = build_patch(rs, Decision(prefill=3, decode=2, reasons=()), now=T0)
    assert set(patch["spec"]) == {"serveConfigV2"}
    assert patch["metadata"]["annotations"] == {CHANGED_AT_ANNOTATION.format(role="decode"): "100000",
                                                CHANGED_AT_ANNOTATION.format(role="prefill"): "100000"}


def test_merge_patch_follows_rfc_7386():
    target = {"a": {"b": 1, "c": [1, 2]}, "d": 2}
    assert merge_patch(target, {"a": {"c": [3], "e": None}, "d": None, "f": {"g": 1}}) == {"a": {"b": 1, "c": [3]},
                                                                                           "f": {"g": 1}}
    assert target == {"a": {"b": 1, "c": [1, 2]}, "d": 2}  # not modified


def test_a_rayservice_the_chart_did_not_render_is_refused():
    rs = copy.deepcopy(render("default").rayservice)
    rs["spec"]["serveConfigV2"] = "applications: [{name: other, import_path: x:y}]"
    with pytest.raises(PlanError, match="no Serve application"):
        role_states(rs)
    rs = render_values({"app_name": "llm"}).rayservice
    assert role_states(rs)["prefill"].replicas == 1  # found by its import path, whatever its name


# ---------------------------------------------------------------------------------------------- loop
class FakeKube:
    def __init__(self, rayservice: dict) -> None:
        self.rayservice = rayservice
        self.patches: list[dict] = []

    def get_rayservice(self, namespace, name):
        assert (namespace, name) == ("llm", "dsaserve")
        return copy.deepcopy(self.rayservice)

    def patch_rayservice(self, namespace, name, patch):
        if crd_available():  # the CRD check proper is test_patched_rayservice_validates_against_the_kuberay_crd
            assert not crd_errors(_apply(self.rayservice, patch))
        self.patches.append(patch)
        self.rayservice = _apply(self.rayservice, patch)
        return self.rayservice


def _planner(kube, observations, clock, **kw):
    it = iter(observations)
    return Planner(kube, "llm", "dsaserve", CFG, lambda: next(it), clock=clock, **kw)


def test_planner_step_patches_only_on_change_and_keeps_cooldowns_across_restarts():
    kube = FakeKube(copy.deepcopy(render("default").rayservice))
    now = [T0]
    steady = Metrics(10, load(1, running=1), load(1, running=10, used=0.3), 400.0)
    slow = Metrics(10, load(1, waiting=5, running=1), load(1, running=10, used=0.3), 3000.0)
    planner = _planner(kube, [steady, slow, slow], lambda: now[0])
    assert planner.step().patched is False and kube.patches == []
    step = planner.step()
    assert step.patched and step.decision.prefill == 3 and len(kube.patches) == 1
    assert role_states(kube.rayservice)["prefill"].replicas == 3
    now[0] += 10
    restarted = _planner(kube, [slow], lambda: now[0])  # a new process reads the cooldown from the annotation
    assert restarted.step().patched is False


def test_dry_run_decides_without_patching():
    kube = FakeKube(copy.deepcopy(render("default").rayservice))
    slow = Metrics(10, load(1, waiting=5, running=1), load(1, running=10, used=0.3), 3000.0)
    step = _planner(kube, [slow], lambda: T0, dry_run=True).step()
    assert step.decision.prefill == 3 and step.patch is not None and not step.patched and kube.patches == []
