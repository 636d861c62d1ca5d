"""Routing benchmark: replay the Mooncake conversation trace through the real routing policies.

A discrete-event simulation of a disaggregated cluster: N prefill workers (each an LRU prefix cache of
``--cache-blocks`` 512-token blocks and a FIFO queue) and D decode workers (sequences occupy blocks for
``output_length × TPOT``; an LRU cache of received prompt blocks, for conditional disaggregation). The
router sees exactly what a dsaserve router sees: per worker its queued work and the matched prefix
from a KV index (``kvstore.index.BlockLocations``, kept current by stored/removed events).

Prefill time is ``router.policy.DSACostModel`` for DeepSeek-V3.2 (671B shape) on one H800 node (8 GPUs):
- linear part (MLA + indexer projections, MoE, sparse attention over min(context, 2048) positions) at
  2.7 PFLOP/s per node = 340 TFLOP/s per GPU (~17 % of FP8 dense peak): ≈32k computed tokens/s at 4k
  context, DeepSeek's published 73.7k input tokens/s per H800 node with 56.3 % cache hits;
- the indexer's quadratic part (each new token scores every earlier one, 64 heads × 128 dims × 61
  layers, FP8) at 4.8 PFLOP/s per node (600 TFLOP/s per GPU);
- 5 ms per request, and a ±10 % lognormal jitter on the actual time (the router's estimate has none).
A 512-token block of V3.2 KV (FP8 latent 656 B + indexer key 132 B per token and layer, 61 layers) is
24.6 MB; the default 8192-block cache per prefill worker is ≈200 GB (HBM plus host DRAM tier).

Load scaling: arrival times are compressed by ``speedup = ρ · N · span / W``, where W is the trace's
prefill work with no cache at all (Σ prefill_s(input_length)) and span its duration; ρ = 0.85 by
default. So the offered work would keep the cluster 85 % busy even with a 0 % hit rate: every policy is
stable, and caching shows up as shorter queues and less compute.

Metrics: ``hit_rate`` = prompt blocks reused (found cached where the prefill ran) / blocks requested;
TTFT = arrival → end of prefill (queueing included); ``max_mean_load`` = the busiest prefill worker's
busy seconds / the mean; ``local_prefill_*`` = what conditional disaggregation moved to decode workers.

``python -m bench.routing --trace FILE --workers N --policy NAME --json`` prints one JSON object;
without ``--policy``/``--json`` it prints a markdown table of every policy.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvstore.index import BlockLocations
from router.policy import (
    POLICIES, DecodeCandidate, PrefillCandidate, RouteRequest, RoutingConfig, make_policy,
)

TRACE_BLOCK = 512  # tokens per hash id in the Mooncake trace
# The shared reference data sits beside the project checkout (../shared/data from the project root).
DEFAULT_TRACE = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mooncake" / "conversation_trace.jsonl")


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


@dataclass(frozen=True)
class SimConfig:
    workers: int = 8
    decode_workers: int | None = None  # default: as many as prefill workers
    cache_blocks: int = 8192  # per prefill worker, 512-token blocks
    decode_blocks: int = 16384  # KV capacity of a decode worker for running sequences
    decode_cache_blocks: int = 4096  # prompt blocks a decode worker keeps for reuse (LRU)
    decode_max_running: int = 256
    tpot_s: float = 0.05
    local_prefill_slowdown: float = 1.5  # a decode worker prefills while it keeps decoding
    utilization: float = 0.85  # ρ: no-cache prefill work / cluster capacity
    jitter: float = 0.1
    seed: int = 0


def load_trace(path: str | Path) -> list[TraceRequest]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out.append(TraceRequest(r["timestamp"] / 1000.0, r["input_length"], r["output_length"],
                                        tuple(r["hash_ids"])))
    out.sort(key=lambda r: r.arrival_s)
    return out


def ceiling_hit_rate(trace: Sequence[TraceRequest]) -> float:
    """Blocks reused / blocks requested with one infinite cache (prefix matches only)."""
    seen: set[int] = set()
    hit = total = 0
    for r in trace:
        total += len(r.hash_ids)
        for h in r.hash_ids:
            if h not in seen:
                break
            hit += 1
        seen.update(r.hash_ids)
    return hit / max(1, total)


class LRUCache:
    """A worker's prefix cache; every change is published to the shared index, as workers do."""

    def __init__(self, worker_id: str, capacity: int, index: BlockLocations) -> None:
        self.worker_id, self.capacity, self.index = worker_id, capacity, index
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def match(self, hash_ids: Sequence[int]) -> int:
        n = 0
        for h in hash_ids:
            if h not in self.blocks:
                break
            self.blocks.move_to_end(h)
            n += 1
        return n

    def insert(self, hash_ids: Sequence[int]) -> None:
        new = [h for h in hash_ids if h not in self.blocks]
        for h in hash_ids:
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        self.index.store(self.worker_id, 1, new)
        evicted = []
        while len(self.blocks) > self.capacity:
            evicted.append(self.blocks.popitem(last=False)[0])
        self.index.remove(self.worker_id, 1, evicted)


@dataclass
class Job:
    req: TraceRequest
    rid: int
    decode: str
    est_s: float
    est_tokens: int
    arrive_s: float  # simulated time


@dataclass
class Server:
    """A FIFO prefill server: a prefill worker, or a decode worker's local prefill queue."""

    cache: LRUCache
    queue: deque = field(default_factory=deque)
    busy_until: float = 0.0
    current: Job | None = None
    queued_s: float = 0.0  # estimates of waiting jobs
    queued_tokens: int = 0
    busy_s: float = 0.0
    served: int = 0
    running: int = 0  # decode sequences (decode workers only)
    used_blocks: int = 0


class Simulation:
    def __init__(self, trace: Sequence[TraceRequest], policy_name: str, cfg: SimConfig, routing: RoutingConfig) -> None:
        self.trace, self.cfg, self.cost = trace, cfg, routing.cost
        self.policy = make_policy(policy_name, routing, random.Random(cfg.seed))
        self.rng = random.Random(cfg.seed + 1)
        self.index, self.dindex = BlockLocations(), BlockLocations()
        self.prefill = {f"p{i}": Server(LRUCache(f"p{i}", cfg.cache_blocks, self.index)) for i in range(cfg.workers)}
        nd = cfg.decode_workers or cfg.workers
        self.decode = {f"d{i}": Server(LRUCache(f"d{i}", cfg.decode_cache_blocks, self.dindex)) for i in range(nd)}
        span = max(1e-9, trace[-1].arrival_s - trace[0].arrival_s)
        work = sum(self.cost.prefill_s(r.input_length) for r in trace)
        self.speedup = cfg.utilization * cfg.workers * span / work
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = 0
        self.ttft: list[float] = []
        self.hit_blocks = self.req_blocks = self.local = 0
        self.reasons: dict[str, int] = {}

    def push(self, t: float, kind: str, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def run(self) -> dict:
        t0 = self.trace[0].arrival_s
        for rid, r in enumerate(self.trace):
            self.push((r.arrival_s - t0) / self.speedup, "arrive", rid)
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            if kind == "arrive":
                self.arrive(now, payload)  # type: ignore[arg-type]
            elif kind == "prefill_done":
                self.finish_prefill(now, *payload)  # type: ignore[misc]
            else:
                srv, blocks = payload  # type: ignore[misc]
                srv.running -= 1
                srv.used_blocks -= blocks
        return self.report()

    def prefill_candidates(self, now: float, r: TraceRequest) -> list[PrefillCandidate]:
        """What the router sees: index matches, and the load a worker reports (its own estimate)."""
        matches = self.index.longest_prefix(r.hash_ids, self.prefill)
        out = []
        for w, s in self.prefill.items():
            jobs = [*s.queue, *([s.current] if s.current else [])]
            out.append(PrefillCandidate(
                w, matched_blocks=matches[w][0], queued_tokens=s.queued_tokens,
                queued_s=s.queued_s + max(0.0, s.busy_until - now), running=len(jobs),
                cached_blocks=len(s.cache.blocks), active_blocks=sum(len(j.req.hash_ids) for j in jobs)))
        return out

    def decode_candidates(self, r: TraceRequest) -> list[DecodeCandidate]:
        matches = self.dindex.longest_prefix(r.hash_ids, self.decode)
        cfg = self.cfg
        return [DecodeCandidate(
            w, free_blocks=cfg.decode_blocks - s.used_blocks if s.running < cfg.decode_max_running else 0,
            total_blocks=cfg.decode_blocks, running=s.running, matched_blocks=matches[w][0],
            queued_prefill_tokens=s.queued_tokens) for w, s in self.decode.items()]

    def arrive(self, now: float, rid: int) -> None:
        r = self.trace[rid]
        req = RouteRequest(r.input_length, TRACE_BLOCK, r.output_length)
        d = self.policy.route(req, self.prefill_candidates(now, r), self.decode_candidates(r))
        self.reasons[d.reason] = self.reasons.get(d.reason, 0) + 1
        cached = d.expected_cached_tokens
        slow = 1.0 if d.prefill_worker is not None else self.cfg.local_prefill_slowdown
        est = self.cost.prefill_s(r.input_length - cached, cached) * slow
        srv = self.prefill[d.prefill_worker] if d.prefill_worker is not None else self.decode[d.decode_worker]
        self.local += d.prefill_worker is None
        job = Job(r, rid, d.decode_worker, est, r.input_length - cached, now)
        srv.queue.append(job)
        srv.queued_s += est
        srv.queued_tokens += job.est_tokens
        if srv.current is None:
            self.start(now, srv)

    def start(self, now: float, srv: Server) -> None:
        job = srv.queue.popleft()
        srv.queued_s -= job.est_s
        srv.queued_tokens -= job.est_tokens
        r = job.req
        hit = srv.cache.match(r.hash_ids)  # what is cached now, not what the router expected
        cached = max(0, min(hit * TRACE_BLOCK, r.input_length - 1))
        self.hit_blocks += hit
        self.req_blocks += len(r.hash_ids)
        slow = self.cfg.local_prefill_slowdown if srv.cache.index is self.dindex else 1.0
        service = self.cost.prefill_s(r.input_length - cached, cached) * slow
        service *= self.rng.lognormvariate(0.0, self.cfg.jitter)
        srv.current, srv.busy_until = job, now + service
        srv.busy_s += service
        self.push(now + service, "prefill_done", (srv, job))

    def finish_prefill(self, now: float, srv: Server, job: Job) -> None:
        srv.current = None
        srv.served += 1
        srv.cache.insert(job.req.hash_ids)
        self.ttft.append(now - job.arrive_s)
        dec = self.decode[job.decode]
        if srv is not dec:
            dec.cache.insert(job.req.hash_ids)  # the decode worker now holds the prompt's blocks
        blocks = -(-(job.req.input_length + job.req.output_length) // TRACE_BLOCK)
        dec.running += 1
        dec.used_blocks += blocks
        self.push(now + job.req.output_length * self.cfg.tpot_s, "decode_done", (dec, blocks))
        if srv.queue:
            self.start(now, srv)

    def report(self) -> dict:
        ttft = sorted(self.ttft)
        q = lambda p: ttft[min(len(ttft) - 1, int(p * len(ttft)))]  # noqa: E731
        busy = [s.busy_s for s in self.prefill.values()]
        mean_busy = sum(busy) / len(busy)
        local_busy = sum(s.busy_s for s in self.decode.values())
        return {
            "hit_rate": self.hit_blocks / max(1, self.req_blocks),
            "ttft_p50_s": q(0.50), "ttft_p99_s": q(0.99), "ttft_mean_s": sum(ttft) / len(ttft),
            "max_mean_load": max(busy) / mean_busy if mean_busy > 0 else 1.0,
            "requests": len(ttft), "local_prefill_fraction": self.local / max(1, len(ttft)),
            "local_prefill_work_share": local_busy / max(1e-9, local_busy + sum(busy)),
            "speedup": self.speedup, "prefill_busy_fraction": sum(busy) / (len(busy) * max(1e-9, self.last_time())),
            "reasons": dict(sorted(self.reasons.items())),
        }

    def last_time(self) -> float:
        return (self.trace[-1].arrival_s - self.trace[0].arrival_s) / self.speedup


def run(trace: Sequence[TraceRequest], policy: str, cfg: SimConfig, routing: RoutingConfig | None = None) -> dict:
    t = time.perf_counter()
    out = Simulation(trace, policy, cfg, routing or RoutingConfig()).run()
    ceiling = ceiling_hit_rate(trace)
    out.update(policy=policy, workers=cfg.workers, ceiling_hit_rate=ceiling,
               hit_rate_vs_ceiling=out["hit_rate"] / ceiling if ceiling else None,
               utilization=cfg.utilization, cache_blocks=cfg.cache_blocks, wall_s=time.perf_counter() - t)
    return out


def markdown(rows: list[dict]) -> str:
    rr = next((r for r in rows if r["policy"] == "round_robin"), None)
    head = rows[0]
    lines = [f"Trace ceiling (one infinite cache): {head['ceiling_hit_rate']:.1%} of blocks; {head['workers']} "
             f"prefill workers, ρ = {head['utilization']}, arrivals {head['speedup']:.2f}× faster", "",
             "| policy | hit rate | of ceiling | TTFT p50 (s) | TTFT p99 (s) | p50 vs round-robin | max/mean load |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        gain = f"{rr['ttft_p50_s'] / r['ttft_p50_s']:.2f}×" if rr else "—"
        lines.append(f"| {r['policy']} | {r['hit_rate']:.1%} | {r['hit_rate_vs_ceiling']:.0%} | {r['ttft_p50_s']:.3f} | "
                     f"{r['ttft_p99_s']:.2f} | {gain} | {r['max_mean_load']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", default=DEFAULT_TRACE, help="Mooncake-format JSONL trace")
    p.add_argument("--workers", type=int, default=8, help="prefill workers")
    p.add_argument("--decode-workers", type=int, default=None, help="decode workers (default: --workers)")
    p.add_argument("--policy", choices=POLICIES, default=None, help="one policy (default: all, as a table)")
    p.add_argument("--json", action="store_true", help="print one JSON object (with --policy) or a list")
    p.add_argument("--cache-blocks", type=int, default=SimConfig.cache_blocks,
                   help="512-token blocks per prefill worker")
    p.add_argument("--utilization", type=float, default=SimConfig.utilization, help="ρ: no-cache work / capacity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a RoutingConfig field of dsaserve (ablations), e.g. --set alpha=1")
    a = p.parse_args(argv)
    try:
        routing = RoutingConfig(**{k: type(getattr(RoutingConfig, k))(v) for k, v in (s.split("=", 1) for s in a.set)})
    except (ValueError, AttributeError, TypeError) as e:
        p.error(f"--set: {e}")
    trace = load_trace(a.trace)
    if not trace:
        p.error(f"{a.trace}: no requests")
    cfg = SimConfig(workers=a.workers, decode_workers=a.decode_workers, cache_blocks=a.cache_blocks,
                    utilization=a.utilization, seed=a.seed)
    rows = [run(trace, name, cfg, routing) for name in ([a.policy] if a.policy else POLICIES)]
    if a.json:
        json.dump(rows[0] if a.policy else rows, sys.stdout)
        print()
    else:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
