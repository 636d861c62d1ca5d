"""``--dtype`` on the commands that load a model: ``generate --dtype bfloat16`` serves a bf16 model,
``auto`` follows the machine, and a bad value is an argument error before any model loads."""

from __future__ import annotations

import json

import pytest
import torch

import cluster.local
from cluster.cli import main
from workers.model import device

from ..engine.conftest import tiny_ckpt  # noqa: F401  (fixture)

N_TOKENS = 4


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """The weight dtype of every model ``LocalBackend`` loads (the real load, observed)."""
    dtypes: list[torch.dtype] = []
    real = cluster.local.load_model

    def load_model(*args, **kwargs):
        model = real(*args, **kwargs)
        dtypes.append(model.embed.weight.dtype)
        return model

    monkeypatch.setattr(cluster.local, "load_model", load_model)
    return dtypes


def generate(capsys: pytest.CaptureFixture[str], ckpt, *extra: str) -> dict:
    argv = ["generate", "--model", str(ckpt), "--prompt-ids", "2,30,400,5", "--max-tokens", str(N_TOKENS),
            "--ignore-eos", "--json", *extra]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    return json.loads(out[0])


def test_generate_bfloat16(capsys, tiny_ckpt, loaded):  # noqa: F811
    out = generate(capsys, tiny_ckpt, "--dtype", "bfloat16")
    assert loaded == [torch.bfloat16]
    assert len(out["token_ids"]) == N_TOKENS and out["finish_reason"] == "length"
    assert out["usage"]["prompt_tokens"] == 4 and out["usage"]["completion_tokens"] == N_TOKENS


@pytest.mark.parametrize(("fast", "want"), [(True, torch.bfloat16), (False, torch.float32)],
                         ids=["bf16-cpu", "avx2-cpu"])
def test_generate_auto_is_the_default_and_follows_the_cpu(
    capsys, monkeypatch, tiny_ckpt, loaded, fast, want  # noqa: F811
):
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: fast)
    generate(capsys, tiny_ckpt)
    assert loaded == [want]


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--prompt-ids", "1"],
        ["local", "--port", "0"],
        ["batch", "--input", "in.jsonl", "--output", "out.jsonl"],
        ["serve", "--config", "cluster.yaml"],
    ],
    ids=["generate", "local", "batch", "serve"],
)
@pytest.mark.parametrize("bad", ["fp16", "bf16", "AUTO"])
def test_bad_dtype_is_an_argument_error(capsys, loaded, argv, bad):
    assert main([*argv, "--dtype", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"argument --dtype: invalid choice: '{bad}'" in err[0], err
    assert "'auto', 'float32', 'bfloat16'" in err[0]
    assert loaded == []
