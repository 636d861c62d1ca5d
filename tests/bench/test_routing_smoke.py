"""The routing benchmark's CLI contract, on the first 300 requests of the Mooncake trace (or, where the
shared data is absent, a synthetic trace of the same format)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bench.routing import (
    DEFAULT_TRACE, NO_PULLS, TRACE_BLOCK, Job, SimConfig, Simulation, TraceRequest, load_trace, markdown, run, run_all,
)
from router.policy import PeerPull, RoutingConfig

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
    assert 0.0 < result["ttft_p50_s"] <= result["ttft_p90_s"] <= result["ttft_p99_s"]
    assert result["max_mean_load"] >= 1.0
    assert result["peer_pulls"] is True and result["pull_bytes"] >= 0 and result["handoff_bytes"] > 0


def test_markdown_table_of_every_policy(tmp_path: Path):
    trace = small_trace(tmp_path / "trace.jsonl", n=100)
    table = bench("--trace", str(trace), "--workers", "4")
    for name in ("dsaserve", "dsaserve (no pulls)", "round_robin", "least_load", "sglang_cache_aware", "dynamo_cost"):
        assert f"| {name} |" in table
    assert "ceiling" in table


def test_set_parses_bools_and_turns_pulls_off(tmp_path: Path):
    trace = small_trace(tmp_path / "trace.jsonl")
    result = json.loads(bench("--trace", str(trace), "--workers", "32", "--policy", "dsaserve", "--json",
                              "--set", "peer_pulls=false"))
    assert result["peer_pulls"] is False and result["pulls_planned"] == result["pulls"] == 0
    assert result["pulled_blocks"] == result["pull_bytes"] == 0 and "peer_pull" not in result["reasons"]
    assert result["handoff_bytes"] > 0 and result["kv_moved_gb"] > 0
    assert 0.0 < result["ttft_p50_s"] <= result["ttft_p90_s"] <= result["ttft_p99_s"]
    bad = subprocess.run([sys.executable, "-m", "bench.routing", "--trace", str(trace), "--set", "peer_pulls=maybe"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "peer_pulls" in bad.stderr


def test_parse_overrides():
    from bench.routing import parse_overrides

    assert parse_overrides(["peer_pulls=false"]).peer_pulls is False
    assert parse_overrides(["peer_pulls=True"]).peer_pulls is True
    assert parse_overrides(["peer_pulls=0", "alpha=1", "step_tokens=512"]) == \
        RoutingConfig(peer_pulls=False, alpha=1.0, step_tokens=512)
    for bad in (["peer_pulls=maybe"], ["nonsense=1"], ["cost=1"], ["alpha"]):
        with pytest.raises(ValueError):
            parse_overrides(bad)


@pytest.mark.parametrize("workers, cache_blocks", [(32, 8192), (8, 128)])  # many workers; small caches
def test_pulls_happen_and_are_counted(tmp_path: Path, workers: int, cache_blocks: int):
    trace = load_trace(small_trace(tmp_path / "trace.jsonl"))
    cfg = SimConfig(workers=workers, cache_blocks=cache_blocks)
    on = run(trace, "dsaserve", cfg)
    off = run(trace, "dsaserve", cfg, RoutingConfig(peer_pulls=False))
    block_bytes = RoutingConfig().cost.kv_bytes_per_token * TRACE_BLOCK
    assert on["peer_pulls"] and on["pulls_planned"] > 0 and on["reasons"].get("peer_pull", 0) > 0
    assert 0 < on["pulls"] <= on["pulls_planned"]
    assert 0 < on["pulled_blocks"] <= on["pull_blocks_moved"]
    assert on["pull_bytes"] == on["pull_blocks_moved"] * block_bytes > 0
    assert on["pulled_fraction"] == pytest.approx(on["pulled_blocks"] / sum(len(r.hash_ids) for r in trace))
    assert on["pulled_fraction"] <= on["hit_rate"] and on["pull_s_mean"] > 0
    assert on["handoff_bytes"] > 0 and on["handoff_bytes"] % block_bytes == 0
    assert not off["peer_pulls"] and off["pulls_planned"] == off["pulls"] == off["pull_bytes"] == 0
    assert off["pulled_blocks"] == 0 and off["handoff_bytes"] > 0
    assert on["requests"] == off["requests"] == len(trace)


def test_pull_reads_only_what_the_source_still_holds():
    """The source evicted the tail of the planned range: only its leading blocks still there move."""
    trace = [TraceRequest(float(t), 6 * TRACE_BLOCK, 10, tuple(range(6))) for t in (0, 1)]
    sim = Simulation(trace, "dsaserve", SimConfig(workers=2), RoutingConfig())
    src, dst = sim.prefill["p0"], sim.prefill["p1"]
    src.cache.insert(range(4))  # blocks 4 and 5 are gone from the source
    dst.cache.insert(range(1))
    job = Job(trace[1], 1, "d0", 0.0, 0, 0.0, PeerPull("p0", 1, 5))
    hit, seconds = sim.pull(0.0, dst, job, dst.cache.match(trace[1].hash_ids))
    assert hit == 4 and sim.pulled_blocks == sim.pull_blocks_moved == 3 and sim.pulls_short == 1
    assert sim.pull_bytes == 3 * sim.block_bytes and seconds == pytest.approx(sim.pull_bytes / 25e9)
    assert list(dst.cache.blocks) == [0, 1, 2, 3] and sim.index.longest_prefix(range(6), ["p1"])["p1"][0] == 4


def test_index_lag_and_pending_routes(tmp_path: Path):
    trace = load_trace(small_trace(tmp_path / "trace.jsonl", n=150))
    for pending in (False, True):
        r = run(trace, "dsaserve", SimConfig(workers=8, index_lag_s=1.0, pending_routes=pending))
        assert r["requests"] == 150 and r["pending_routes"] is pending and 0 <= r["hit_rate"] <= 1


def test_table_has_the_no_pulls_row(tmp_path: Path):
    trace = load_trace(small_trace(tmp_path / "trace.jsonl", n=100))
    rows = run_all(trace, SimConfig(workers=4), RoutingConfig())
    assert [r["policy"] for r in rows][:2] == ["dsaserve", NO_PULLS]
    table = markdown(rows)
    assert "| dsaserve (no pulls) |" in table and "TTFT p90" in table and "pulls (GB)" in table
    off = run_all(trace, SimConfig(workers=4), RoutingConfig(peer_pulls=False))
    assert NO_PULLS not in [r["policy"] for r in off]  # the dsaserve row is already without pulls
