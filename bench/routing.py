"""Routing benchmark: replay the Mooncake conversation trace through the real routing policies.

A discrete-event simulation of a disaggregated cluster: N prefill workers (each an LRU prefix cache of
``--cache-blocks`` 512-token blocks and a FIFO queue) and D decode workers (sequences occupy blocks for
``output_length × TPOT``; an LRU cache of received prompt blocks, for conditional disaggregation). The
router sees exactly what a dsaserve router sees: per worker its queued work and the matched prefix
from a KV index (``kvstore.index.BlockLocations``, kept current by stored/removed events).

Prefill time is ``router.cost_model.DSACostModel`` for DeepSeek-V3.2 (671B shape) on one H800 node (8 GPUs):
- linear part (MLA + indexer projections, MoE, sparse attention over min(context, 2048) positions) at
  2.7 PFLOP/s per node = 340 TFLOP/s per GPU (~17 % of FP8 dense peak): ≈32k computed tokens/s at 4k
  context, DeepSeek's published 73.7k input tokens/s per H800 node with 56.3 % cache hits;
- the indexer's quadratic part (each new token scores every earlier one, 64 heads × 128 dims × 61
  layers, FP8) at 4.8 PFLOP/s per node (600 TFLOP/s per GPU);
- 5 ms per request, and a ±10 % lognormal jitter on the actual time (the router's estimate has none).
A 512-token block of V3.2 KV (FP8 latent 656 B + indexer key 132 B per token and layer, 61 layers) is
24.6 MB; the default 8192-block cache per prefill worker is ≈200 GB (HBM plus host DRAM tier).

KV transfers (``SimConfig.link_bytes_per_s``, default 25e9 B/s: one 200 Gb/s NIC per worker). The router
is offered every worker, prefill or decode, whose index match is > 0 as a pull source (``PullSource``,
with its waiting and running uncached tokens), a block's bytes (``kv_bytes_per_token × 512``) and the
link speed. A planned pull is carried out when its job starts on the puller: the leading blocks of the
planned range the source still holds *then* (touched in its LRU) and the puller lacks are copied into
the puller's cache; the job's service time grows by bytes / link, plus whatever is left of the holder's
current step (the export wait the policy prices), and its prefill is priced with the tokens actually
cached. Prefill→decode hand-offs move the prompt blocks the decode worker does not hold yet. Not
modelled: link contention (every transfer gets the whole link), the hand-off's time (TTFT ends with the
prefill), pull failures other than eviction, and the real dispatcher's route-time lease on the source.

Index lag (``--index-lag-s``): a worker's stored/removed blocks reach the router's index that many
seconds late (the real publisher batches every 0.1 s); ``--pending-routes``: the router extends index
matches by the blocks it routed (``router.pending.PendingRoutes``: in flight, then 10 s).

Load scaling: arrival times are compressed by ``speedup = ρ · N · span / W``, where W is the trace's
prefill work with no cache at all (Σ prefill_s(input_length)) and span its duration; ρ = 0.85 by
default. So the offered work would keep the cluster 85 % busy even with a 0 % hit rate: every policy is
stable, and caching shows up as shorter queues and less compute.

Metrics: ``hit_rate`` = prompt blocks reused (found cached where the prefill ran) / blocks requested;
TTFT = arrival → end of prefill (queueing included); ``max_mean_load`` = the busiest prefill worker's
busy seconds / the mean; ``local_prefill_*`` = what conditional disaggregation moved to decode workers;
``pulled_fraction`` = blocks read by peer pulls that the prefill reused / blocks requested (part of the
hit rate); ``pull_bytes``, ``handoff_bytes`` = KV bytes moved by pulls and by hand-offs.

``python -m bench.routing --trace FILE --workers N --policy NAME --json`` prints one JSON object;
without ``--policy``/``--json`` it prints a markdown table of every policy, with a "dsaserve (no pulls)"
row (``--set peer_pulls=false``) after dsaserve. ``--set FIELD=VALUE`` overrides a RoutingConfig field.
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
from dataclasses import MISSING, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path

from kvstore.index import BlockLocations
from router.cost_model import DSACostModel
from router.pending import PendingRoutes
from router.policy import (
    POLICIES, DecodeCandidate, PeerPull, PrefillCandidate, PullSource, RouteRequest, RoutingConfig, make_policy,
)

TRACE_BLOCK = 512  # tokens per hash id in the Mooncake trace
# The shared reference data sits beside the project checkout (../shared/data from the project root).
DEFAULT_TRACE = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mooncake" / "conversation_trace.jsonl")
NO_PULLS = "dsaserve (no pulls)"  # the table's variant row: dsaserve with ``peer_pulls=False``


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
    link_bytes_per_s: float = 25e9  # KV link between any two workers: one 200 Gb/s NIC (peer pulls)
    index_lag_s: float = 0.0  # a worker's stored/removed blocks reach the router's index this late
    pending_routes: bool = False  # the router remembers the blocks it routed (router.pending)
    pending_ttl_s: float = 10.0  # ... while in flight and this long after the prefill


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


class MemoCostModel(DSACostModel):
    """``DSACostModel`` with ``prefill_s`` memoized (a pure function; the policy calls it per candidate)."""

    @classmethod
    def of(cls, model: DSACostModel) -> "MemoCostModel":
        return model if isinstance(model, cls) else cls(**{f.name: getattr(model, f.name) for f in fields(model)})

    @cached_property
    def _memo(self) -> dict[tuple[int, int], float]:
        return {}

    def prefill_s(self, new_tokens: int, cached_tokens: int = 0) -> float:
        key = (new_tokens, cached_tokens)
        memo = self._memo
        if key not in memo:
            if len(memo) > 1 << 20:
                memo.clear()
            memo[key] = super().prefill_s(new_tokens, cached_tokens)
        return memo[key]


def publish_now(index: BlockLocations, worker_id: str, stored: list[int], removed: list[int]) -> None:
    index.store(worker_id, 1, stored)
    index.remove(worker_id, 1, removed)


class LRUCache:
    """A worker's prefix cache; every change is published to the shared index, as workers do
    (``publish``: at once by default; the simulation may delay it, see ``SimConfig.index_lag_s``)."""

    def __init__(self, worker_id: str, capacity: int, index: BlockLocations, publish=publish_now) -> None:
        self.worker_id, self.capacity, self.index, self.publish = worker_id, capacity, index, publish
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
        evicted = []
        while len(self.blocks) > self.capacity:
            evicted.append(self.blocks.popitem(last=False)[0])
        self.publish(self.index, self.worker_id, new, evicted)


@dataclass
class Job:
    req: TraceRequest
    rid: int
    decode: str
    est_s: float
    est_tokens: int
    arrive_s: float  # simulated time
    pull: PeerPull | None = None
    export_ready_s: float = 0.0  # the holder has leased the prefix (after its current step)


@dataclass
class Server:
    """A FIFO prefill server: a prefill worker, or a decode worker's local prefill queue."""

    cache: LRUCache
    queue: deque = field(default_factory=deque)
    busy_until: float = 0.0
    current: Job | None = None
    queued_s: float = 0.0  # estimates of waiting jobs
    queued_tokens: int = 0
    active_blocks: int = 0  # prompt blocks of waiting and running jobs
    busy_s: float = 0.0
    served: int = 0
    running: int = 0  # decode sequences (decode workers only)
    used_blocks: int = 0


class Simulation:
    def __init__(self, trace: Sequence[TraceRequest], policy_name: str, cfg: SimConfig, routing: RoutingConfig) -> None:
        routing = replace(routing, cost=MemoCostModel.of(routing.cost))  # same numbers, computed once
        self.trace, self.cfg, self.cost = trace, cfg, routing.cost
        self.policy = make_policy(policy_name, routing, random.Random(cfg.seed))
        self.rng = random.Random(cfg.seed + 1)
        self.index, self.dindex = BlockLocations(), BlockLocations()
        publish = self.publish_later if cfg.index_lag_s > 0 else publish_now
        self.prefill = {f"p{i}": Server(LRUCache(f"p{i}", cfg.cache_blocks, self.index, publish))
                        for i in range(cfg.workers)}
        nd = cfg.decode_workers or cfg.workers
        self.decode = {f"d{i}": Server(LRUCache(f"d{i}", cfg.decode_cache_blocks, self.dindex, publish))
                       for i in range(nd)}
        self.now = 0.0
        self.pending = PendingRoutes(cfg.pending_ttl_s, clock=lambda: self.now) if cfg.pending_routes else None
        self.block_bytes = self.cost.kv_bytes_per_token * TRACE_BLOCK
        span = max(1e-9, trace[-1].arrival_s - trace[0].arrival_s)
        work = sum(self.cost.prefill_s(r.input_length) for r in trace)
        self.speedup = cfg.utilization * cfg.workers * span / work
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = 0
        self.ttft: list[float] = []
        self.hit_blocks = self.req_blocks = self.local = 0
        self.pulls_planned = self.pulls = self.pulled_blocks = self.pull_blocks_moved = self.pulls_short = 0
        self.pulls_from_decode = 0  # pulls whose source was a decode worker's prompt cache
        self.pull_bytes = self.handoff_bytes = 0
        self.pull_s = 0.0
        self.reasons: dict[str, int] = {}

    def push(self, t: float, kind: str, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def publish_later(self, index: BlockLocations, worker_id: str, stored: list[int], removed: list[int]) -> None:
        if stored or removed:  # workers publish in batches: the router learns of the change late
            self.push(self.now + self.cfg.index_lag_s, "publish", (index, worker_id, stored, removed))

    def run(self) -> dict:
        t0 = self.trace[0].arrival_s
        for rid, r in enumerate(self.trace):
            self.push((r.arrival_s - t0) / self.speedup, "arrive", rid)
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            self.now = now
            if kind == "arrive":
                self.arrive(now, payload)  # type: ignore[arg-type]
            elif kind == "prefill_done":
                self.finish_prefill(now, *payload)  # type: ignore[misc]
            elif kind == "publish":
                publish_now(*payload)  # type: ignore[misc]
            else:
                srv, blocks = payload  # type: ignore[misc]
                srv.running -= 1
                srv.used_blocks -= blocks
        return self.report()

    def matches(self, r: TraceRequest) -> tuple[dict[str, int], dict[str, int], list[PullSource]]:
        """Per prefill and per decode worker: the leading prompt blocks the router believes it holds
        (the KV index, extended by pending routes when the router keeps them), and the pull sources:
        only what the index shows, as ``router.routing`` does (pending blocks may not be computed yet)."""
        pm = {w: m[0] for w, m in self.index.longest_prefix(r.hash_ids, self.prefill).items()}
        dm = {w: m[0] for w, m in self.dindex.longest_prefix(r.hash_ids, self.decode).items()}
        sources = self.pull_sources(pm, dm)
        if self.pending is not None:
            pm = self.pending.extend(r.hash_ids, pm, self.prefill)
            dm = self.pending.extend(r.hash_ids, dm, self.decode)
        return pm, dm, sources

    def prefill_candidates(self, now: float, matched: dict[str, int]) -> list[PrefillCandidate]:
        """What the router sees: index matches, and the load a worker reports (its own estimate)."""
        return [PrefillCandidate(
            w, matched_blocks=matched[w], queued_tokens=s.queued_tokens,
            queued_s=s.queued_s + max(0.0, s.busy_until - now), running=len(s.queue) + (s.current is not None),
            cached_blocks=len(s.cache.blocks), active_blocks=s.active_blocks) for w, s in self.prefill.items()]

    def decode_candidates(self, matched: dict[str, int]) -> list[DecodeCandidate]:
        cfg = self.cfg
        return [DecodeCandidate(
            w, free_blocks=cfg.decode_blocks - s.used_blocks if s.running < cfg.decode_max_running else 0,
            total_blocks=cfg.decode_blocks, running=s.running, matched_blocks=matched[w],
            queued_prefill_tokens=s.queued_tokens) for w, s in self.decode.items()]

    def pull_sources(self, pm: dict[str, int], dm: dict[str, int]) -> list[PullSource]:
        """Every worker, prefill or decode, the router believes holds a leading part of the prompt, with
        its uncached tokens waiting or running (what its stats plus the router's own count report)."""
        out = []
        for matched, servers in ((pm, self.prefill), (dm, self.decode)):
            for w, n in matched.items():
                if n > 0:
                    s = servers[w]
                    out.append(PullSource(w, n, s.queued_tokens + (s.current.est_tokens if s.current else 0)))
        return out

    def server(self, worker_id: str) -> Server:
        return self.prefill[worker_id] if worker_id in self.prefill else self.decode[worker_id]

    def arrive(self, now: float, rid: int) -> None:
        r = self.trace[rid]
        pm, dm, sources = self.matches(r)
        req = RouteRequest(r.input_length, TRACE_BLOCK, r.output_length, block_bytes=self.block_bytes,
                           link_bytes_per_s=self.cfg.link_bytes_per_s)
        d = self.policy.route(req, self.prefill_candidates(now, pm), self.decode_candidates(dm), sources=sources)
        self.reasons[d.reason] = self.reasons.get(d.reason, 0) + 1
        cached = d.expected_cached_tokens
        slow = 1.0 if d.prefill_worker is not None else self.cfg.local_prefill_slowdown
        est = self.cost.prefill_s(r.input_length - cached, cached) * slow
        srv = self.prefill[d.prefill_worker] if d.prefill_worker is not None else self.decode[d.decode_worker]
        self.local += d.prefill_worker is None
        job = Job(r, rid, d.decode_worker, est, r.input_length - cached, now, d.pull)
        if d.pull is not None:
            self.pulls_planned += 1
            src = next(s for s in sources if s.worker_id == d.pull.source)
            job.export_ready_s = now + self.policy.pull_s(req, src, 0)  # type: ignore[attr-defined]
        if self.pending is not None:
            for w in {d.prefill_worker or d.decode_worker, d.decode_worker}:
                self.pending.record(str(rid), w, r.hash_ids)
        srv.queue.append(job)
        srv.queued_s += est
        srv.queued_tokens += job.est_tokens
        srv.active_blocks += len(r.hash_ids)
        if srv.current is None:
            self.start(now, srv)

    def pull(self, now: float, srv: Server, job: Job, hit: int) -> tuple[int, float]:
        """Carry out ``job``'s planned pull as ``srv`` starts it: read the leading blocks of the planned
        range that the source still holds *now* and ``srv`` lacks. Returns (blocks now cached, seconds)."""
        assert job.pull is not None
        r, p = job.req, job.pull
        wait = max(0.0, job.export_ready_s - now)  # the export waited for the holder's current step
        want = r.hash_ids[p.first_block:p.first_block + p.num_blocks]
        held = self.server(p.source).cache.match(want)  # what survived in the source's LRU (touched)
        self.pulls_short += held < len(want)
        got = want[:held]
        missing = [p.first_block + i for i, h in enumerate(got) if h not in srv.cache.blocks]
        moved = len(missing)
        if moved == 0:
            return hit, wait
        nbytes = moved * self.block_bytes
        seconds = wait + nbytes / self.cfg.link_bytes_per_s
        srv.cache.insert(got)
        now_hit = srv.cache.match(r.hash_ids)
        self.pulls += 1
        self.pulls_from_decode += p.source in self.decode
        self.pull_blocks_moved += moved
        self.pulled_blocks += sum(i < now_hit for i in missing)  # moved blocks in the reused prefix
        self.pull_bytes += nbytes
        self.pull_s += seconds
        return now_hit, seconds

    def start(self, now: float, srv: Server) -> None:
        job = srv.queue.popleft()
        srv.queued_s -= job.est_s
        srv.queued_tokens -= job.est_tokens
        r = job.req
        hit = srv.cache.match(r.hash_ids)  # what is cached now, not what the router expected
        transfer = 0.0
        if job.pull is not None:
            hit, transfer = self.pull(now, srv, job, hit)
        cached = max(0, min(hit * TRACE_BLOCK, r.input_length - 1))
        self.hit_blocks += hit
        self.req_blocks += len(r.hash_ids)
        slow = self.cfg.local_prefill_slowdown if srv.cache.index is self.dindex else 1.0
        service = self.cost.prefill_s(r.input_length - cached, cached) * slow
        service = transfer + service * self.rng.lognormvariate(0.0, self.cfg.jitter)
        srv.current, srv.busy_until = job, now + service
        srv.busy_s += service
        self.push(now + service, "prefill_done", (srv, job))

    def finish_prefill(self, now: float, srv: Server, job: Job) -> None:
        srv.current = None
        srv.served += 1
        srv.active_blocks -= len(job.req.hash_ids)
        srv.cache.insert(job.req.hash_ids)
        if self.pending is not None:
            self.pending.finish(str(job.rid))
        self.ttft.append(now - job.arrive_s)
        dec = self.decode[job.decode]
        if srv is not dec:  # the hand-off: the decode worker reads the prompt's blocks it lacks
            self.handoff_bytes += sum(h not in dec.cache.blocks for h in job.req.hash_ids) * self.block_bytes
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
            "ttft_p50_s": q(0.50), "ttft_p90_s": q(0.90), "ttft_p99_s": q(0.99), "ttft_mean_s": sum(ttft) / len(ttft),
            "max_mean_load": max(busy) / mean_busy if mean_busy > 0 else 1.0,
            "requests": len(ttft), "local_prefill_fraction": self.local / max(1, len(ttft)),
            "local_prefill_work_share": local_busy / max(1e-9, local_busy + sum(busy)),
            "speedup": self.speedup, "prefill_busy_fraction": sum(busy) / (len(busy) * max(1e-9, self.last_time())),
            "pulls_planned": self.pulls_planned, "pulls": self.pulls, "pulls_short": self.pulls_short,
            "pulls_from_decode": self.pulls_from_decode,
            "pulled_blocks": self.pulled_blocks, "pull_blocks_moved": self.pull_blocks_moved,
            "pulled_fraction": self.pulled_blocks / max(1, self.req_blocks),
            "pull_bytes": self.pull_bytes, "handoff_bytes": self.handoff_bytes,
            "kv_moved_gb": (self.pull_bytes + self.handoff_bytes) / 1e9,
            "pull_s_mean": self.pull_s / max(1, self.pulls),
            "reasons": dict(sorted(self.reasons.items())),
        }

    def last_time(self) -> float:
        return (self.trace[-1].arrival_s - self.trace[0].arrival_s) / self.speedup


def run(trace: Sequence[TraceRequest], policy: str, cfg: SimConfig, routing: RoutingConfig | None = None,
        label: str | None = None) -> dict:
    """One simulation; ``label`` names the row (default: the policy)."""
    t = time.perf_counter()
    routing = routing or RoutingConfig()
    out = Simulation(trace, policy, cfg, routing).run()
    ceiling = ceiling_hit_rate(trace)
    out.update(policy=label or policy, workers=cfg.workers, ceiling_hit_rate=ceiling,
               hit_rate_vs_ceiling=out["hit_rate"] / ceiling if ceiling else None,
               utilization=cfg.utilization, cache_blocks=cfg.cache_blocks,
               peer_pulls=policy == "dsaserve" and routing.peer_pulls, link_bytes_per_s=cfg.link_bytes_per_s,
               index_lag_s=cfg.index_lag_s, pending_routes=cfg.pending_routes, wall_s=time.perf_counter() - t)
    return out


def run_all(trace: Sequence[TraceRequest], cfg: SimConfig, routing: RoutingConfig) -> list[dict]:
    """Every policy, plus dsaserve without peer pulls right after dsaserve (when pulls are on)."""
    rows = []
    for name in POLICIES:
        rows.append(run(trace, name, cfg, routing))
        if name == "dsaserve" and routing.peer_pulls:
            rows.append(run(trace, name, cfg, replace(routing, peer_pulls=False), label=NO_PULLS))
    return rows


def markdown(rows: list[dict]) -> str:
    rr = next((r for r in rows if r["policy"] == "round_robin"), None)
    head = rows[0]
    lag = f", index lag {head['index_lag_s']} s" if head["index_lag_s"] else ""
    lag += ", pending routes" if head["pending_routes"] else ""
    lines = [f"Trace ceiling (one infinite cache): {head['ceiling_hit_rate']:.1%} of blocks; {head['workers']} "
             f"prefill workers, ρ = {head['utilization']}, arrivals {head['speedup']:.2f}× faster, "
             f"link {head['link_bytes_per_s'] / 1e9:g} GB/s{lag}", "",
             "| policy | hit rate | of ceiling | pulled | TTFT p50 (s) | TTFT p90 (s) | TTFT p99 (s) "
             "| p50 vs round-robin | max/mean load | pulls (GB) | hand-off (GB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gain = f"{rr['ttft_p50_s'] / r['ttft_p50_s']:.2f}×" if rr else "—"
        lines.append(f"| {r['policy']} | {r['hit_rate']:.1%} | {r['hit_rate_vs_ceiling']:.0%} | "
                     f"{r['pulled_fraction']:.1%} | {r['ttft_p50_s']:.3f} | {r['ttft_p90_s']:.2f} | "
                     f"{r['ttft_p99_s']:.2f} | {gain} | {r['max_mean_load']:.2f} | {r['pull_bytes'] / 1e9:,.0f} | "
                     f"{r['handoff_bytes'] / 1e9:,.0f} |")
    return "\n".join(lines)


TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def parse_overrides(items: Sequence[str]) -> RoutingConfig:
    """``FIELD=VALUE`` strings → a RoutingConfig; each value takes its field's type (a bool field:
    true/false, 1/0, yes/no, on/off; ``bool("false")`` would be True)."""
    kinds = {f.name: type(f.default) for f in fields(RoutingConfig) if f.default is not MISSING}
    kwargs: dict[str, object] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"expected FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        kind = kinds.get(k)
        if kind not in (bool, int, float, str):
            raise ValueError(f"not a settable RoutingConfig field: {k!r}")
        if kind is bool:
            if v.strip().lower() not in TRUE | FALSE:
                raise ValueError(f"{k}: expected true or false, got {v!r}")
            kwargs[k] = v.strip().lower() in TRUE
        else:
            kwargs[k] = kind(v)
    return RoutingConfig(**kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", default=DEFAULT_TRACE, help="Mooncake-format JSONL trace")
    p.add_argument("--workers", type=int, default=8, help="prefill workers")
    p.add_argument("--decode-workers", type=int, default=None, help="decode workers (default: --workers)")
    p.add_argument("--policy", choices=POLICIES, default=None, help="one policy (default: all, as a table)")
    p.add_argument("--json", action="store_true", help="print one JSON object (with --policy) or a list")
    p.add_argument("--cache-blocks", type=int, default=SimConfig.cache_blocks,
                   help="512-token blocks per prefill worker")
    p.add_argument("--decode-cache-blocks", type=int, default=SimConfig.decode_cache_blocks,
                   help="prompt blocks a decode worker keeps for reuse")
    p.add_argument("--utilization", type=float, default=SimConfig.utilization, help="ρ: no-cache work / capacity")
    p.add_argument("--link-bytes-per-s", type=float, default=SimConfig.link_bytes_per_s,
                   help="KV link speed between workers, for pulls (default 25e9: one 200 Gb/s NIC)")
    p.add_argument("--index-lag-s", type=float, default=SimConfig.index_lag_s,
                   help="seconds before a worker's cache changes reach the router's index")
    p.add_argument("--pending-routes", action="store_true",
                   help="the router remembers blocks it routed (router.pending.PendingRoutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a RoutingConfig field of dsaserve (ablations), e.g. --set alpha=1 "
                        "or --set peer_pulls=false")
    a = p.parse_args(argv)
    try:
        routing = parse_overrides(a.set)
    except (ValueError, TypeError) as e:
        p.error(f"--set: {e}")
    trace = load_trace(a.trace)
    if not trace:
        p.error(f"{a.trace}: no requests")
    cfg = SimConfig(workers=a.workers, decode_workers=a.decode_workers, cache_blocks=a.cache_blocks,
                    decode_cache_blocks=a.decode_cache_blocks, utilization=a.utilization, seed=a.seed,
                    link_bytes_per_s=a.link_bytes_per_s, index_lag_s=a.index_lag_s, pending_routes=a.pending_routes)
    rows = [run(trace, a.policy, cfg, routing)] if a.policy else run_all(trace, cfg, routing)
    if a.json:
        json.dump(rows[0] if a.policy else rows, sys.stdout)
        print()
    else:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
