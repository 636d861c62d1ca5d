"""The routing benchmark's CLI contract, on the first 300 requests of the Mooncake trace (or, where the
shared data is absent, a synthetic trace of the same format)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from bench.routing import DEFAULT_TRACE

ROOT = Path(__file__).resolve().parents[2]


def small_trace(path: Path, n: int = 300) -> Path:
    source = Path(DEFAULT_TRACE)
    if source.is_file():
        with source.open() as f:
            path.write_text("".join(line for _, line in zip(range(n), f)))
        return path
    rng, next_id, convs, lines = random.Random(0), 1, [], []
    for i in range(n):  # multi-turn conversations over a shared system-prompt block 0
        if convs and rng.random() < 0.5:
            conv = rng.choice(convs)
            conv.extend(range(next_id, next_id + 2))
            next_id += 2
        else:
            conv = [0, *range(next_id, next_id + rng.randint(1, 8))]
            next_id = conv[-1] + 1
            convs.append(conv)
        lines.append(json.dumps({"timestamp": i * 300, "input_length": len(conv) * 512 - 100,
                                 "output_length": rng.randint(1, 500), "hash_ids": list(conv)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def bench(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "bench.routing", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_json_contract(tmp_path: Path):
    trace = small_trace(tmp_path / "trace.jsonl")
    result = json.loads(bench("--trace", str(trace), "--workers", "8", "--policy", "dsaserve", "--json"))
    assert result["policy"] == "dsaserve" and result["requests"] == 300
    assert 0.0 <= result["hit_rate"] <= result["ceiling_hit_rate"] <= 1.0
    assert 0.0 < result["ttft_p50_s"] <= result["ttft_p99_s"]
    assert result["max_mean_load"] >= 1.0


def test_markdown_table_of_every_policy(tmp_path: Path):
    trace = small_trace(tmp_path / "trace.jsonl", n=100)
    table = bench("--trace", str(trace), "--workers", "4")
    for name in ("dsaserve", "round_robin", "least_load", "sglang_cache_aware", "dynamo_cost"):
        assert f"| {name} |" in table
    assert "ceiling" in table
