"""``ClusterConfig.dtype``: ``auto`` by default, checked at load, and handed to both worker deployments
(each replica resolves it on its own machine, ``cluster.servers._EngineServer``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ClusterConfig, ClusterConfigError, load_config


def test_default_is_auto():
    assert ClusterConfig(model="tiny").dtype == "auto"


@pytest.mark.parametrize("dtype", ["auto", "float32", "bfloat16"])
def test_yaml_accepts_the_choices(tmp_path: Path, dtype: str):
    path = tmp_path / "cluster.yaml"
    path.write_text(f"model: tiny\ndtype: {dtype}\n")
    assert load_config(path).dtype == dtype


def test_yaml_rejects_an_unknown_dtype_naming_the_field(tmp_path: Path):
    path = tmp_path / "cluster.yaml"
    path.write_text("model: tiny\ndtype: fp16\n")
    with pytest.raises(ClusterConfigError, match=r"cluster\.yaml: dtype: .*'auto', 'float32' or 'bfloat16'"):
        load_config(path)


@pytest.mark.parametrize("dtype", ["bfloat16", "auto"])
def test_prefill_and_decode_deployments_get_the_dtype(dtype: str):
    pytest.importorskip("ray")
    from cluster.app import build_app

    app = build_app(ClusterConfig(model="tiny", dtype=dtype), Path("/models/tiny"))
    # The router is bound with the prefill and decode applications as its first two arguments.
    router = app._bound_deployment
    workers = {a._bound_deployment.name: a._bound_deployment for a in router.init_args[:2]}
    assert set(workers) == {"prefill", "decode"}
    for deployment in workers.values():
        assert deployment.init_kwargs["dtype"] == dtype


@pytest.mark.parametrize(("dtype", "fast", "want"), [("auto", False, "float32"), ("auto", True, "bfloat16"),
                                                     ("float32", True, "float32")])
def test_a_replica_loads_the_model_in_the_dtype_its_machine_resolves(monkeypatch, dtype, fast, want):
    pytest.importorskip("ray")
    import torch

    from cluster import servers
    from workers.engine.config import EngineConfig
    from workers.model import device

    class Loaded(Exception):
        """Stops the replica right after the load (the rest needs a running Ray)."""

    def load_model(path, *, dtype, device, fp8_weights):
        assert device == torch.device("cpu") and fp8_weights == "resident"  # device "auto" without CUDA
        seen.append(dtype)
        raise Loaded

    seen: list = []
    monkeypatch.setattr(servers, "load_model", load_model)
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: fast)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the replica's own setting, not this process's
    with pytest.raises(Loaded):
        servers.DecodeServer("/models/tiny", EngineConfig(), "ray", dtype=dtype)
    assert seen == [getattr(torch, want)]


def test_fp8_weights_reach_both_deployments_and_dequantize_needs_one_rank():
    pytest.importorskip("ray")
    from cluster.app import build_app

    app = build_app(ClusterConfig(model="tiny", fp8_weights="dequantize"), Path("/models/tiny"))
    workers = [a._bound_deployment for a in app._bound_deployment.init_args[:2]]
    assert [w.init_kwargs["fp8_weights"] for w in workers] == ["dequantize", "dequantize"]
    assert ClusterConfig(model="tiny").fp8_weights == "resident"
    with pytest.raises(ValueError, match="fp8_weights: dequantize needs ep_size 1"):
        ClusterConfig(model="tiny", fp8_weights="dequantize", prefill={"ep_size": 2})
