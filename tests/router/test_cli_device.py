"""``--device`` on the commands that load a model: ``cpu`` and ``auto`` (no GPU here → the CPU) load the
weights and the KV cache on the CPU, ``cuda`` where this process sees no GPU is a one-line error naming
``device`` before any model loads, and a malformed value is an argument error."""

from __future__ import annotations

import json

import pytest
import torch

import cluster.local
from cluster.cli import main

from ..engine.conftest import tiny_ckpt  # noqa: F401  (fixture)


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.device, torch.dtype]]:
    """(device, dtype) of every model ``LocalBackend`` loads (the real load, observed)."""
    seen: list[tuple[torch.device, torch.dtype]] = []
    real = cluster.local.load_model

    def load_model(*args, **kwargs):
        model = real(*args, **kwargs)
        seen.append((model.embed.weight.device, model.embed.weight.dtype))
        return model

    monkeypatch.setattr(cluster.local, "load_model", load_model)
    return seen


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_generate_on_the_cpu_in_bfloat16(capsys, tiny_ckpt, loaded, device):  # noqa: F811
    argv = ["generate", "--model", str(tiny_ckpt), "--prompt-ids", "2,30,400,5", "--max-tokens", "3",
            "--ignore-eos", "--json", "--device", device, "--dtype", "bfloat16"]
    assert main(argv) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 3 and out["finish_reason"] == "length"
    assert loaded == [(torch.device("cpu"), torch.bfloat16)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("argv", [["generate", "--prompt-ids", "1"], ["local", "--port", "0"]], ids=["generate", "local"])
def test_cuda_without_a_gpu_is_a_clear_error(capsys, tiny_ckpt, loaded, argv):  # noqa: F811
    assert main([*argv, "--model", str(tiny_ckpt), "--device", "cuda:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device: device 'cuda:1': this process sees 0 CUDA device(s)" in err[0], err
    assert loaded == []


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "CPU"])
def test_bad_device_is_an_argument_error(capsys, loaded, bad):
    assert main(["generate", "--prompt-ids", "1", "--device", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --device: device must be auto, cpu, cuda or cuda:N" in err[0], err
    assert loaded == []
