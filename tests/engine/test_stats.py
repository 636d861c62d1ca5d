"""WorkerStats: the worker entry of ``dsaserve status --json`` (a CLI contract), its JSON round trip,
and what a real engine reports in it."""

from __future__ import annotations

import asyncio
import json

import pytest

from cluster.local import LocalBackend
from tests.engine.conftest import prompt
from workers.engine.config import EngineConfig
from workers.engine.types import GenerateRequest, SamplingParams, TransferStats, WorkerStats

# The keys checks and scripts read from ``dsaserve status --json``: never rename or repurpose one.
WORKER_KEYS = {"id", "role", "requests_total", "running", "waiting", "free_blocks", "total_blocks", "tokens_per_s",
               "queued_tokens", "kv_transfer", "healthy", "indexed", "weight_bytes", "kv_bytes_per_token"}
KV_TRANSFER_KEYS = {"backend", "bytes", "transfers", "failures"}
# Keys present only when the worker has that part (expert parallelism, context-cache tiers, peer pulls...).
OPTIONAL_WORKER_KEYS = {"ep", "context_cache_hits", "peer_pulls", "step_tokens", "disk_volume"}

FULL = WorkerStats(
    worker_id="decode-1", role="decode", waiting=2, running=3, free_blocks=40, total_blocks=64, tokens_per_s=12.5,
    requests_total=7, queued_tokens=100, healthy=False, indexed=True,
    kv_transfer=TransferStats("nixl", bytes=4096, transfers=5, failures=1, seconds=0.25),
    weight_bytes=123456, kv_bytes_per_token=1152.0,
    ep={"ep_size": 2, "rank": 0, "healthy": True, "bytes_sent": 512, "pids": [11, 12]},
    context_cache_hits={"host": 3, "shared": 2},
    peer_pulls={"pulled_blocks": 9, "pulled_bytes": 900, "pull_failures": 1, "exported_blocks": 4},
    step_tokens=2048, disk_volume="ab12",
)
MINIMAL = WorkerStats(worker_id="prefill-0", role="prefill", waiting=0, running=0, free_blocks=8, total_blocks=8)


def test_to_json_is_the_cli_shape():
    # Distinct values per field: a key that changed meaning (or swapped with another) shows here.
    assert FULL.to_json() == {
        "id": "decode-1", "role": "decode", "requests_total": 7, "running": 3, "waiting": 2, "free_blocks": 40,
        "total_blocks": 64, "tokens_per_s": 12.5, "queued_tokens": 100,
        "kv_transfer": {"backend": "nixl", "bytes": 4096, "transfers": 5, "failures": 1, "seconds": 0.25},
        "healthy": False, "indexed": True, "weight_bytes": 123456, "kv_bytes_per_token": 1152.0,
        "ep": {"ep_size": 2, "rank": 0, "healthy": True, "bytes_sent": 512, "pids": [11, 12]},
        "context_cache_hits": {"host": 3, "shared": 2},
        "peer_pulls": {"pulled_blocks": 9, "pulled_bytes": 900, "pull_failures": 1, "exported_blocks": 4},
        "step_tokens": 2048, "disk_volume": "ab12",
    }
    plain = MINIMAL.to_json()  # no EP block, no read timing: those keys are absent, not null
    assert set(plain) == WORKER_KEYS and set(plain["kv_transfer"]) == KV_TRANSFER_KEYS
    assert (plain["healthy"], plain["indexed"], plain["kv_transfer"]["backend"]) == (True, None, "none")


@pytest.mark.parametrize("stats", [FULL, MINIMAL], ids=["every-field", "defaults"])
def test_from_json_reads_back_what_to_json_wrote(stats):
    assert WorkerStats.from_json(json.loads(json.dumps(stats.to_json()))) == stats


def test_from_json_refuses_an_entry_missing_a_contract_key():
    d = MINIMAL.to_json()
    del d["queued_tokens"]
    with pytest.raises(KeyError, match="queued_tokens"):
        WorkerStats.from_json(d)


def test_engines_report_load_and_kv_transfer(tiny_ckpt):
    with LocalBackend.start(tiny_ckpt, engine_config=EngineConfig(num_blocks=64)) as be:
        idle = be.decode_engine.stats()
        assert (idle.role, idle.running, idle.waiting, idle.queued_tokens) == ("decode", 0, 0, 0)
        assert idle.free_blocks == idle.total_blocks == 64 and idle.kv_transfer == TransferStats("local")

        async def run():
            req = GenerateRequest("r", prompt(40), SamplingParams(max_tokens=4, ignore_eos=True))
            return [o async for o in be.generate(req)]

        assert asyncio.run(run())[-1].finished
        prefill, decode = be.worker_stats()
        assert (prefill.role, prefill.requests_total, prefill.kv_transfer.backend) == ("prefill", 1, "local")
        assert decode.requests_total == 1 and decode.healthy and decode.indexed is None
        moved = decode.kv_transfer
        assert (moved.backend, moved.transfers, moved.failures) == ("local", 1, 0) and moved.bytes > 0
        assert decode.tokens_per_s > 0 and decode.tokens_per_s == round(decode.tokens_per_s, 2)
