"""Bad values fail at `helm install` with a message naming the key: the values schema for types and
ranges, the templates' checks for what JSON schema cannot say."""

from __future__ import annotations

import helm_python as helm
import pytest

from tests.helm.render import SCENARIOS, chart, render_values, scenario_values


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_shipped_values_pass_the_schema(scenario):
    chart().validate_schema(scenario_values(scenario))


SCHEMA_ERRORS = {
    "zero replicas": ({"prefill": {"replicas": 0}}, "/prefill/replicas", "minimum"),
    "misspelled key": ({"prefil": {"replicas": 2}}, "'prefil' not allowed", None),
    "misspelled nested key": ({"decode": {"max_num_seq": 8}}, "/decode", "'max_num_seq' not allowed"),
    "unknown transfer": ({"transfer": "tcp"}, "/transfer", "'nixl', 'ray', 'local'"),
    "unknown dtype": ({"dtype": "fp16"}, "/dtype", "'float32', 'bfloat16'"),
    "port out of range": ({"router": {"grpc_port": 70000}}, "/router/grpc_port", "maximum"),
    "negative gpus": ({"decode": {"num_gpus": -1}}, "/decode/num_gpus", "minimum"),
    "ep size zero": ({"prefill": {"ep_size": 0}}, "/prefill/ep_size", "minimum"),
    "text for a number": ({"prefill": {"num_blocks": "many"}}, "/prefill/num_blocks", "integer"),
    "bad quantity": ({"head": {"shmSize": "lots"}}, "/head/shmSize", None),
    "memory limit missing": ({"redis": {"resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": None}}},
                             "/redis/resources", "limits"),
    "service type": ({"router": {"service": {"type": "Ingress"}}}, "/router/service/type", "ClusterIP"),
    "redis url scheme": ({"redis": {"enabled": False, "external": {"url": "http://redis:6379"}}},
                         "/redis/external/url", None),
    "unknown routing policy": ({"routing": {"policy": "random"}}, "/routing/policy", "dsaserve"),
    "volume type": ({"model": {"volume": {"type": "nfs"}}}, "/model/volume/type", "pvc"),
    "api key too short": ({"apiKeys": {"keys": ["abc"]}}, "/apiKeys/keys/0", "minLength"),
    "long release name override": ({"fullnameOverride": "x" * 41}, "/fullnameOverride", "maxLength"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_ERRORS))
def test_schema_rejects_bad_values(case):
    values, where, what = SCHEMA_ERRORS[case]
    with pytest.raises(helm.HelmValuesError) as e:
        chart().validate_schema(values)
    assert where in str(e.value), str(e.value)
    if what:
        assert what in str(e.value), str(e.value)
    with pytest.raises(helm.HelmValuesError):  # and `helm install` (render) refuses them too
        render_values(values)


TEMPLATE_ERRORS = {
    "rank larger than a pod": ({"prefill": {"num_gpus": 2, "group": {"gpusPerPod": 1}}},
                               "prefill.num_gpus is 2 but prefill.group.gpusPerPod is 1"),
    "idle GPUs": ({"decode": {"num_gpus": 0}}, "decode.group.gpusPerPod is 1 but decode.num_gpus is 0"),
    "two redis": ({"redis": {"external": {"url": "redis://elsewhere:6379/0"}}}, "redis.enabled and redis.external.url"),
    "pvc without a claim": ({"model": {"volume": {"pvc": {"claimName": ""}}}}, "model.volume.pvc.claimName is empty"),
    "fetch without a volume": ({"model": {"volume": {"type": "none"}, "fetch": {"enabled": True}}},
                               "model.fetch.enabled needs a model volume"),
    "fetch outside the volume": ({"model": {"path": "/data/m", "fetch": {"enabled": True}}},
                                 "model.path (/data/m) must be under model.volume.mountPath (/models)"),
    "planner bounds": ({"planner": {"enabled": True, "prefill": {"minReplicas": 2, "maxReplicas": 4}}},
                       "planner.prefill: minReplicas 2 <= prefill.replicas 1 <= maxReplicas 4"),
    "port clash": ({"router": {"http_port": 8080}}, "must differ"),
    "disk cache without a volume": ({"decode": {"disk_cache_dir": "/cache", "group": {"diskCacheVolume": None}}},
                                    "decode.disk_cache_dir is set but decode.group.diskCacheVolume is not"),
}


@pytest.mark.parametrize("case", sorted(TEMPLATE_ERRORS))
def test_templates_reject_inconsistent_values(case):
    values, message = TEMPLATE_ERRORS[case]
    chart().validate_schema(values)  # each value is fine alone
    with pytest.raises(helm.HelmRenderError) as e:
        render_values(values)
    assert message in str(e.value), str(e.value)
