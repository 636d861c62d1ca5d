"""Greedy tokens from `dsaserve generate` and from `dsaserve local` + `dsaserve client generate` equal
plain argmax decoding with a full recompute (the model's reference path), on sparse (prompt longer
than index_topk) and dense-equivalent prompts, for a bf16 and an FP8 checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ..engine.conftest import tiny_ckpt, tiny_fp8_ckpt  # noqa: F401  (fixtures)

from workers.model import load_model

from ..engine.conftest import prompt, reference_greedy

N_TOKENS = 6


def _cli(*args: str, timeout: float = 180) -> dict:
    done = subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _ids(p) -> str:
    return ",".join(map(str, p))


@pytest.mark.parametrize("ckpt", ["tiny_ckpt", "tiny_fp8_ckpt"], ids=["bf16", "fp8"])
def test_generate_and_local_server_match_reference(ckpt, request, tmp_path):
    path = request.getfixturevalue(ckpt)
    model = load_model(path)
    prompts = {"sparse": prompt(100, seed=21), "dense": prompt(12, seed=22)}
    want = {name: reference_greedy(model, p, N_TOKENS) for name, p in prompts.items()}
    for name, p in prompts.items():
        out = _cli("generate", "--model", str(path), "--dtype", "float32", "--prompt-ids", _ids(p),
                   "--max-tokens", str(N_TOKENS), "--ignore-eos", "--json")
        assert out["token_ids"] == want[name], name
        assert out["finish_reason"] == "length" and out["usage"]["completion_tokens"] == N_TOKENS
        assert out["text"] == ""  # no tokenizer files in this checkpoint: token ids only

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "local.log").open("w+")
    server = subprocess.Popen([sys.executable, "-m", "cluster.cli", "local", "--model", str(path), "--dtype", "float32",
                               "--port", str(port), "--http-port", "0"],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while "ready" not in (tmp_path / "local.log").read_text():
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "local.log").read_text()
            time.sleep(0.2)
        for name, p in prompts.items():
            out = _cli("client", "generate", "--address", f"127.0.0.1:{port}", "--prompt-ids", _ids(p),
                       "--max-tokens", str(N_TOKENS), "--ignore-eos", "--json")
            assert out["token_ids"] == want[name], name
            assert out["usage"]["prompt_tokens"] == len(p)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
