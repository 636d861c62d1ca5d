"""The serving CLI: offline and served ``generate --json`` agree; ``batch`` survives bad lines and
resumes; ``local`` serves until SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli_serve import main
from router.client import Client
from tests.router.conftest import ServerThread

CONTRACT = {"token_ids", "text", "finish_reason", "usage", "ttft_ms"}
ARGS = ["--prompt", "Hello, world", "--max-tokens", "5", "--ignore-eos", "--json"]


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # one JSON object
    return json.loads(out[0])


def test_client_generate_json_matches_offline_generate(
    capsys: pytest.CaptureFixture[str], server: ServerThread, tiny_dir: Path
) -> None:
    served = run_json(capsys, ["client", "generate", "--address", server.address, *ARGS])
    assert CONTRACT <= set(served)
    assert set(served["usage"]) == {"prompt_tokens", "cached_tokens", "completion_tokens"}
    assert len(served["token_ids"]) == 5 and served["finish_reason"] == "length"
    offline = run_json(capsys, ["generate", "--model", str(tiny_dir), "--dtype", "float32", *ARGS])  # as the server
    for key in ("token_ids", "text", "finish_reason"):
        assert offline[key] == served[key]
    assert offline["usage"]["prompt_tokens"] == served["usage"]["prompt_tokens"]


def test_client_errors_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], server: ServerThread) -> None:
    assert main(["client", "generate", "--address", server.address, "--prompt-ids", "5", "--top-p", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsaserve: error: INVALID_ARGUMENT") and "top_p" in err[0]


def read_results(path: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [r["id"] for r in lines]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {r["id"]: r for r in lines}


def test_batch_bad_lines_and_resume(capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_dir: Path) -> None:
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    good = [{"id": f"g{i}", "prompt": f"Story {i}:", "max_tokens": 3, "ignore_eos": True} for i in range(4)]
    lines = [
        json.dumps(good[0]),
        "{not json",
        json.dumps({"id": "neg", "prompt": "x", "temperature": -1}),
        json.dumps({"id": "typo", "prompt_ids": [5], "max_tokenz": 3}),
        json.dumps(good[1]),
        "",
    ]
    inp.write_text("\n".join(lines) + "\n")
    argv = ["batch", "--model", str(tiny_dir), "--input", str(inp), "--output", str(out), "--concurrency", "2"]
    assert main(argv) == 0
    results = read_results(out)
    assert set(results) == {"g0", "g1", "line-2", "neg", "typo"}
    assert results["neg"]["error"]["field"] == "temperature"
    assert results["typo"]["error"]["field"] == "max_tokenz"
    assert results["line-2"]["error"]["field"] == "line"
    for rid in ("g0", "g1"):
        assert CONTRACT <= set(results[rid]) and len(results[rid]["token_ids"]) == 3

    # Resume after a crash that tore the last line: the done ids are skipped, the torn one reruns.
    text = out.read_text().splitlines()
    torn = json.loads(text[-1])["id"]
    out.write_text("\n".join(text[:-1]) + "\n" + text[-1][:10])
    with inp.open("a") as f:
        f.write(json.dumps(good[2]) + "\n" + json.dumps(good[3]) + "\n")
    capsys.readouterr()
    assert main(argv) == 0
    assert "4 already in" in capsys.readouterr().err
    lines_after = out.read_text().splitlines()
    assert lines_after[len(text) - 1] == text[-1][:10]  # the torn fragment stays on a line of its own
    del lines_after[len(text) - 1]
    again = {json.loads(line)["id"]: json.loads(line) for line in lines_after}
    assert len(again) == len(lines_after)  # every other line is whole, no id twice
    assert set(again) == {"g0", "g1", "g2", "g3", "line-2", "neg", "typo"} and torn in again
    assert again["g0"] == results["g0"] or torn == "g0"


def test_local_serves_until_sigterm(tiny_dir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli_serve", "local", "--model", str(tiny_dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline()
        assert "ready on 127.0.0.1:" in line, line + proc.stderr.read()
        address = line.split("ready on ")[1].split()[0]
        with Client(address, timeout=30) as c:
            assert c.health() == "SERVING"
            assert len(c.generate(prompt_ids=[0, 5], max_tokens=2, ignore_eos=True).token_ids) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
