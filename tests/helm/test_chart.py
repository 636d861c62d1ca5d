"""The chart rendered with real Helm: what it deploys, and that it agrees with the code it deploys."""

from __future__ import annotations

import ast
import math
import re

import pytest
import yaml

from cluster.config import ClusterConfig, WorkerGroupConfig
from cluster.k8s_planner import pods_for, role_states
from tests.helm.render import NAMESPACE, ROOT, SCENARIOS, render, render_values

SELECTOR = {"app.kubernetes.io/name": "dsaserve", "app.kubernetes.io/instance": "dsaserve"}
EP_SUPPORTED = "ep_size" in WorkerGroupConfig.model_fields


AHEAD_OF_CODE = {"ep_size", "ep_timeout_s"}  # expert parallelism (issue 6): written only when set


def _unsupported_keys(args: dict) -> list[str]:
    """Keys the chart may write before ClusterConfig has them: only the expert-parallel ones."""
    fields = WorkerGroupConfig.model_fields
    return [f"{r}.{k}" for r in ("prefill", "decode") for k in args.get(r, {}) if k in AHEAD_OF_CODE and k not in fields]


def _containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


@pytest.fixture(params=sorted(SCENARIOS))
def rendered(request):
    return render(request.param)


def test_renders_the_deployment(rendered):
    kinds = rendered.kinds()
    assert {"RayService", "Service", "ConfigMap", "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy",
            "PodDisruptionBudget"} <= kinds
    assert ("StatefulSet" in kinds) == (rendered.scenario != "external-redis")
    assert rendered.rayservice["apiVersion"] == "ray.io/v1"
    groups = [g["groupName"] for g in rendered.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    assert groups == ["prefill", "decode"]


def test_serve_args_are_a_valid_cluster_config(rendered):
    """serveConfigV2's args are exactly what cluster.app:app_builder validates (extra keys forbidden)."""
    args = rendered.args
    unsupported = _unsupported_keys(args)
    trimmed = {k: ({kk: vv for kk, vv in v.items() if f"{k}.{kk}" not in unsupported} if isinstance(v, dict) else v)
               for k, v in args.items()}
    config = ClusterConfig.model_validate(trimmed)
    assert config.router.host == "0.0.0.0"
    assert config.app_name == rendered.serve_config["applications"][0]["name"]
    configmap = rendered.one("ConfigMap", "dsaserve-config")
    assert yaml.safe_load(configmap["data"]["cluster.yaml"]) == args
    assert yaml.safe_load(configmap["data"]["serve.yaml"]) == rendered.serve_config


def test_ep_size_is_written_where_cluster_config_reads_it():
    args = render("multinode").args
    assert args["prefill"]["ep_size"] == 16 and args["decode"]["ep_size"] == 16
    assert "ep_size" not in render("default").args["prefill"]  # 1 is the default: never written
    if not EP_SUPPORTED:
        pytest.skip("ClusterConfig has no prefill/decode.ep_size yet (issue 6); the chart writes ep_size > 1 "
                    "to args.<kind>.ep_size, which ClusterConfig will read once it has the field")
    ClusterConfig.model_validate(args)


def test_values_map_onto_cluster_config():
    values, args = render("gpu").values, render("gpu").args
    assert args["prefill"]["replicas"] == values["prefill"]["replicas"]
    assert args["prefill"]["num_blocks"] == 1048576  # large integers stay integers through Helm
    assert args["max_model_len"] == values["max_model_len"]
    assert args["router"]["replicas"] == values["router"]["replicas"]
    assert args["model"] == values["model"]["path"]
    assert "max_model_len" not in render("default").args  # null: the model's
    cfg = ClusterConfig.model_validate(render("gpu").args)  # CUDA graphs on GPU replicas by default
    assert cfg.prefill.cuda_graph_max_batch == cfg.decode.cuda_graph_max_batch == 64
    assert cfg.decode.engine(block_size=64, max_model_len=None, max_queue=8, lease_s=1.0).cuda_graph_max_batch == 64
    values = render("gpu").values
    eager = render_values({**values, "decode": {**values["decode"], "cuda_graph_max_batch": 0}}).args
    assert eager["decode"]["cuda_graph_max_batch"] == 0  # --enforce-eager for the decode group


def test_serve_config_is_a_ray_serve_deploy_config(rendered):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(rendered.serve_config)
    app = schema.applications[0]
    assert app.import_path == "cluster.app:app_builder"
    assert schema.grpc_options.port == rendered.args["router"]["grpc_port"]
    assert schema.http_options.port == rendered.args["router"]["http_port"]


def test_grpc_servicers_are_the_apps():
    tree = ast.parse((ROOT / "cluster" / "app.py").read_text())
    servicers = next(ast.literal_eval(n.value) for n in tree.body
                     if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "GRPC_SERVICERS")
    assert render("default").serve_config["grpc_options"]["grpc_servicer_functions"] == servicers


def test_gpu_groups_request_gpus_and_cpu_values_none():
    for scenario in ("default", "gpu", "multinode"):
        r = render(scenario)
        for kind in ("prefill", "decode"):
            template = r.worker_group(kind)["template"]
            res = template["spec"]["containers"][0]["resources"]
            gpus = r.values.get(kind, {}).get("group", {}).get("gpusPerPod", 1)
            assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == gpus
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in template["spec"]["tolerations"]
        head = r.rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
        assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert head["rayStartParams"]["num-gpus"] == "0"
    cpu = render("cpu")
    assert "nvidia.com/gpu" not in yaml.safe_dump(cpu.rayservice)
    assert cpu.args["dtype"] == "float32" and cpu.args["prefill"]["num_gpus"] == 0


def test_scheduling_values_reach_the_worker_pods():
    r = render("gpu")
    spec = r.worker_group("prefill")["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert spec["priorityClassName"] == "high-priority"
    assert spec["imagePullSecrets"] == [{"name": "registry-creds"}]
    assert spec["containers"][0]["image"] == "registry.example.com/llm/dsaserve:0.1.0-cu128"
    assert {"name": "NCCL_DEBUG", "value": "WARN"} in spec["containers"][0]["env"]
    assert r.worker_group("prefill")["rayStartParams"]["object-store-memory"] == "20000000000"
    assert r.worker_group("prefill")["template"]["metadata"]["annotations"]["example.com/team"] == "llm"


def test_every_container_has_resources_and_runs_as_non_root(rendered):
    for name, template in rendered.pod_templates().items():
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        for c in _containers(template):
            where = f"{name}/{c['name']}"
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert "memory" in c["resources"]["limits"], where
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], where
    autoscaler = rendered.rayservice["spec"]["rayClusterConfig"].get("autoscalerOptions")
    if autoscaler:
        assert autoscaler["resources"]["limits"]["memory"]


def test_ray_pods_have_shm_and_the_model_volume(rendered):
    volume_type = rendered.values.get("model", {}).get("volume", {}).get("type", "pvc")
    fetch = rendered.values.get("model", {}).get("fetch", {}).get("enabled", False)
    for kind in ("head", "prefill", "decode"):
        template = rendered.pod_templates()[kind]
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and volumes["dshm"]["emptyDir"]["sizeLimit"]
        mounts = {m["name"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["dshm"]["mountPath"] == "/dev/shm"
        if volume_type == "none":
            assert "model" not in volumes
            continue
        key = {"pvc": "persistentVolumeClaim", "hostPath": "hostPath", "emptyDir": "emptyDir"}[volume_type]
        assert key in volumes["model"] and mounts["model"]["readOnly"] is True
        assert rendered.args["model"].startswith(mounts["model"]["mountPath"])
        inits = template["spec"].get("initContainers", [])
        assert [c["name"] for c in inits] == (["fetch-model"] if fetch else [])
        if fetch:
            env = {e["name"]: e.get("value") for e in inits[0]["env"]}
            assert env["MODEL_DIR"] == rendered.args["model"]
            assert bool(env["MODEL_ALLOW"]) == (kind == "head")  # the head fetches config and tokenizer only
            assert not inits[0]["volumeMounts"][0].get("readOnly")


def test_chart_created_model_claim():
    pvc = render("gpu").one("PersistentVolumeClaim", "dsaserve-models")
    assert pvc["metadata"]["name"] == "dsaserve-models" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert "PersistentVolumeClaim" not in render("default").kinds()  # an existing claim by default


def _env(template: dict) -> dict:
    return {e["name"]: e for e in template["spec"]["containers"][0]["env"]}


def test_redis_in_the_release_with_auth_from_a_secret():
    r = render("default")
    sts = r.one("StatefulSet")
    secret = r.one("Secret", "dsaserve-redis")
    assert len(secret["data"]["redis-password"]) > 20
    redis = sts["spec"]["template"]["spec"]["containers"][0]
    assert redis["args"][redis["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    ref = _env(sts["spec"]["template"])["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "dsaserve-redis", "key": "redis-password"}
    assert r.args["redis_url"] == f"redis://:${{REDIS_PASSWORD}}@dsaserve-redis.{NAMESPACE}.svc:6379/0"
    for kind in ("head", "prefill", "decode"):
        assert _env(r.pod_templates()[kind])["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref
    assert r.one("Service", "dsaserve-redis")["spec"]["selector"] == {**SELECTOR, "app.kubernetes.io/component": "redis"}
    persistent = render("gpu").one("StatefulSet")
    assert persistent["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "16Gi"


def test_external_redis():
    r = render("external-redis")
    assert r.args["redis_url"] == r.values["redis"]["external"]["url"]
    assert not [s for s in r.of_kind("Secret") if "redis" in s["metadata"]["name"]]
    ref = _env(r.pod_templates()["decode"])["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "shared-redis", "key": "password"}
    assert not [n for n in r.of_kind("NetworkPolicy") if n["metadata"]["name"].endswith("-redis")]


def test_api_keys_secret_reaches_the_router_pods():
    r = render("gpu")
    secret = r.one("Secret", "dsaserve-api-keys")
    assert secret["stringData"]["api-keys"] == "key-aaaaaaaaaaaa,key-bbbbbbbbbbbb"
    assert _env(r.pod_templates()["head"])["DSASERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "dsaserve-api-keys"
    assert "DSASERVE_API_KEYS" not in _env(render("default").pod_templates()["head"])


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_reach_the_ray_pods(rendered):
    head = rendered.pod_templates()["head"]
    labels = {**head["metadata"]["labels"], "ray.io/serve": "true", "ray.io/is-ray-node": "yes"}  # KubeRay adds these
    port_names = {p["name"] for p in head["spec"]["containers"][0]["ports"]}
    api = rendered.one("Service", "dsaserve")
    assert _selects(api["spec"]["selector"], labels) and api["spec"]["selector"]["ray.io/serve"] == "true"
    ports = {p["name"]: p for p in api["spec"]["ports"]}
    assert ports["grpc"]["port"] == rendered.args["router"]["grpc_port"] and ports["grpc"]["targetPort"] in port_names
    assert ports["http"]["targetPort"] in port_names
    metrics = rendered.one("Service", "dsaserve-metrics")
    for kind in ("head", "prefill", "decode"):
        pod_labels = {**rendered.pod_templates()[kind]["metadata"]["labels"], "ray.io/is-ray-node": "yes"}
        assert _selects(metrics["spec"]["selector"], pod_labels)
    # The pod templates carry no chart version: a chart upgrade alone must not make KubeRay build a new cluster.
    assert "helm.sh/chart" not in head["metadata"]["labels"]


def test_grpc_service_type_for_clients_outside():
    api = render("gpu").one("Service", "dsaserve")
    assert api["spec"]["type"] == "NodePort" and api["spec"]["ports"][0]["nodePort"] == 30051
    lb = render("multinode").one("Service", "dsaserve")
    assert lb["spec"]["type"] == "LoadBalancer" and lb["spec"]["loadBalancerSourceRanges"] == ["10.0.0.0/8"]
    assert "port-forward" in render("default").notes and "loadBalancer.ingress" in render("multinode").notes


def test_pdbs_and_network_policies_select_their_pods(rendered):
    templates = rendered.pod_templates()
    for kind in ("prefill", "decode"):
        pdb = rendered.one("PodDisruptionBudget", f"dsaserve-{kind}")
        assert _selects(pdb["spec"]["selector"]["matchLabels"], templates[kind]["metadata"]["labels"])
        assert not _selects(pdb["spec"]["selector"]["matchLabels"], templates["head"]["metadata"]["labels"])
    ray = rendered.one("NetworkPolicy", "dsaserve-ray")
    for kind in ("head", "prefill", "decode"):
        assert _selects(ray["spec"]["podSelector"]["matchLabels"], {**templates[kind]["metadata"]["labels"],
                                                                     "ray.io/is-ray-node": "yes"})
    api_rule = next(rule for rule in ray["spec"]["ingress"]
                    if {"port": rendered.args["router"]["grpc_port"], "protocol": "TCP"} in rule.get("ports", []))
    assert api_rule.get("from", []) == rendered.values.get("networkPolicy", {}).get("clientFrom", [])


def test_worker_group_sizes_agree_with_the_planner(rendered):
    """The chart and cluster/k8s_planner compute worker pods the same way (ceil(replicas × ep / ranks per pod))."""
    states = role_states(rendered.rayservice)
    planner = rendered.values.get("planner", {})
    for kind in ("prefill", "decode"):
        group, state = rendered.worker_group(kind), states[kind]
        assert state.replicas == rendered.args[kind]["replicas"]
        assert group["replicas"] == state.pods_for(state.replicas)
        if planner.get("enabled"):
            bounds = planner[kind]
            assert group["minReplicas"] == state.pods_for(bounds["minReplicas"])
            assert group["maxReplicas"] == state.pods_for(bounds["maxReplicas"])
        else:
            assert group["minReplicas"] == group["maxReplicas"] == group["replicas"]
        custom = group["rayStartParams"]["resources"]
        assert yaml.safe_load(custom.strip("'")) == {f"dsaserve_{kind}": state.ranks_per_pod}
    mn = role_states(render("multinode").rayservice)["prefill"]
    assert (mn.ep_size, mn.ranks_per_pod, mn.gpus_per_replica) == (16, 8, 16)
    assert render("multinode").worker_group("prefill")["replicas"] == 2 == pods_for(1, 16, 8) == math.ceil(16 / 8)


def test_planner_deployment_runs_the_cli_with_its_service_account():
    from cluster.cli import build_parser

    r = render("multinode")
    deployment = r.one("Deployment", "dsaserve-planner")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = build_parser().parse_args(container["command"][1:] + container["args"])
    assert args.func.__name__ == "cmd_plan"
    assert (args.namespace, args.name) == (NAMESPACE, r.rayservice["metadata"]["name"])
    assert args.router == f"dsaserve.{NAMESPACE}.svc:{r.args['router']['grpc_port']}"
    assert (args.prefill_replicas.min_replicas, args.prefill_replicas.max_replicas) == (1, 2)
    assert args.max_total_gpus == 64
    assert pod["serviceAccountName"] == r.one("ServiceAccount")["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is True
    assert "Deployment" not in render("default").kinds()  # the planner is opt-in


def test_rbac_grants_what_cluster_k8s_calls():
    r = render("default")
    binding = r.one("RoleBinding")
    assert binding["subjects"][0]["name"] == r.one("ServiceAccount")["metadata"]["name"]
    rules = r.one("Role")["rules"]

    def allowed(group, resource, verb):
        return any(group in x["apiGroups"] and resource in x["resources"] and verb in x["verbs"] for x in rules)

    for verb in ("get", "list", "patch"):
        assert allowed("ray.io", "rayservices", verb)
    assert allowed("", "pods", "list") and not allowed("", "pods", "delete")
    assert not allowed("", "secrets", "get")
    for kind in ("head", "prefill", "decode"):  # Ray pods get no API token
        assert r.pod_templates()[kind]["spec"]["automountServiceAccountToken"] is False


def test_service_monitor_is_optional():
    sm = render("gpu").one("ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert _selects(sm["spec"]["selector"]["matchLabels"], render("gpu").one("Service", "dsaserve-metrics")["metadata"]["labels"])
    assert "ServiceMonitor" not in render("default").kinds()


def test_notes_say_how_to_connect(rendered):
    notes = rendered.notes
    assert f"dsaserve.{NAMESPACE}.svc:{rendered.args['router']['grpc_port']}" in notes
    assert "dsaserve client generate" in notes and "dsaserve k8s status" in notes


def test_context_cache_folder_gets_its_volume():
    r = render("gpu")
    decode = r.worker_group("decode")["template"]["spec"]
    volumes = {v["name"]: v for v in decode["volumes"]}
    assert volumes["disk-cache"]["hostPath"]["path"] == "/mnt/nvme/kv"
    mounts = {m["name"]: m for m in decode["containers"][0]["volumeMounts"]}
    assert mounts["disk-cache"]["mountPath"] == r.args["decode"]["disk_cache_dir"] == "/cache/kv"
    assert r.args["decode"]["host_cache_blocks"] == 65536
    assert "disk-cache" not in {v["name"] for v in r.worker_group("prefill")["template"]["spec"]["volumes"]}
    assert "disk_cache_dir" not in r.args["prefill"]


def test_external_redis_tls_and_client_options():
    r = render("external-redis")
    assert r.args["redis"] == {"worker_ttl_s": 20, "username": "dsaserve", "ssl_ca_certs": "/etc/dsaserve/redis-tls/ca.crt",
                               "ssl_certfile": "/etc/dsaserve/redis-tls/tls.crt", "ssl_keyfile": "/etc/dsaserve/redis-tls/tls.key"}
    spec = r.pod_templates()["head"]["spec"]
    assert {"name": "redis-tls", "secret": {"secretName": "shared-redis-tls", "defaultMode": 0o440}} in spec["volumes"]
    assert {"name": "redis-tls", "mountPath": "/etc/dsaserve/redis-tls", "readOnly": True} in spec["containers"][0]["volumeMounts"]
    assert "password" not in r.args["redis"]  # never in the RayService: ${REDIS_PASSWORD} comes from the pod's env
    assert "redis" not in render("cpu").args or render("cpu").args["redis"] == {"worker_ttl_s": 10}


def test_routing_values_reach_the_router():
    assert render("gpu").args["routing"]["policy"] == "dynamo_cost"
    assert render("gpu").args["routing"]["local_prefill_max_tokens"] == 0
    assert render("default").args["routing"] == {"policy": "dsaserve", "alpha": 4, "beta": 1,
                                                 "local_prefill_max_tokens": 1024, "temperature_s": 0.05,
                                                 "peer_pulls": True, "pending_ttl_s": 10}


# ClusterConfig fields the chart sets on purpose without a value of their own.
NOT_FROM_VALUES = {
    "router.host": "always 0.0.0.0 in a pod",
    "redis.password": "a Secret's value never goes into the RayService; the URL carries ${REDIS_PASSWORD}",
    "router.tls": "the chart's tls-front sidecar terminates TLS (values tls.*), not `dsaserve serve`",
    "router.jobs.store_url": "the chart keeps jobs in its Redis (redis_url, with its password and TLS)",
}


def _fields(model, prefix=""):
    from pydantic import BaseModel

    for name, f in model.model_fields.items():
        t = f.annotation
        if isinstance(t, type) and issubclass(t, BaseModel):
            yield from _fields(t, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def _keys(d, prefix=""):
    for k, v in d.items():
        yield f"{prefix}{k}"  # a dict-valued field (e.g. resources) counts as set too
        if isinstance(v, dict):
            yield from _keys(v, f"{prefix}{k}.")


def test_every_cluster_config_field_can_be_set_from_values():
    """A field added to ClusterConfig needs a value in the chart (or a reason here not to have one)."""
    def kind(key: str) -> str:  # prefill and decode are one template
        return re.sub(r"^(prefill|decode)\.", "<kind>.", key)

    rendered = set()
    for scenario in ("gpu", "external-redis", "multinode"):
        rendered |= {kind(k) for k in _keys(render(scenario).args)}
    missing = {kind(f) for f in _fields(ClusterConfig)} - rendered - set(NOT_FROM_VALUES)
    assert not missing, f"ClusterConfig fields the chart cannot set: {sorted(missing)}"


def test_shared_disk_cache_mounts_one_readwritemany_claim_in_every_worker_pod():
    """sharedDiskCache: the args name its folder, every worker pod (not the head) mounts one RWX claim
    there, the chart creates that claim, and the routing settings of peer pulls pass through."""
    from tests.helm.render import render_values

    r = render_values({"sharedDiskCache": {"enabled": True, "mountPath": "/cache/shared", "max_blocks": 5000},
                       "routing": {"peer_pulls": False, "link_bytes_per_s": 2.5e10}})
    config = ClusterConfig.model_validate(r.args)
    assert config.shared_disk_cache.dir == "/cache/shared" and config.shared_disk_cache.max_blocks == 5000
    assert config.routing.peer_pulls is False and config.routing.link_bytes_per_s == 2.5e10
    claim = r.one("PersistentVolumeClaim", "dsaserve-kv-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, template in r.pod_templates().items():
        if name not in ("prefill", "decode", "head"):
            continue
        mounts = {m["name"]: m["mountPath"] for c in _containers(template) for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        if name == "head":
            assert "shared-kv-cache" not in volumes
        else:
            assert mounts["shared-kv-cache"] == "/cache/shared"
            assert volumes["shared-kv-cache"]["persistentVolumeClaim"]["claimName"] == "dsaserve-kv-cache"
    off = render("default")
    assert "shared_disk_cache" not in off.args and "PersistentVolumeClaim" not in off.kinds()
    assert render("gpu").one("PersistentVolumeClaim", "kv-shared")["spec"]["accessModes"] == ["ReadWriteMany"]
