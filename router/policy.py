"""Routing policy: which prefill worker runs a prompt and which decode worker continues it.

Pure: no I/O, no Ray, no clocks. The caller gathers candidates (worker stats plus each worker's
matched prefix from the KV index) and applies the ``RouteDecision``. ``bench.routing`` replays a
production trace through these same classes.

``DSAServePolicy`` (after Dynamo's KV router and Mooncake's conductor):
``cost = α · prefill_s(tokens this worker lacks) + β · queued_s``, where ``prefill_s`` is the DSA cost
model (linear MLA/MoE work, sparse attention over ``min(context, index_topk)`` positions, and the
indexer's quadratic scoring of every earlier token). An imbalance guard keeps load in charge when
queues diverge; softmax over cost breaks near-ties with an injectable RNG; a short uncached remainder is
prefilled on the decode worker (conditional disaggregation). Peer pulls: when another worker (prefill
or decode) holds more of the prompt than a candidate, the candidate may read those blocks from it over
the KV transfer backend instead of recomputing them; the pull costs the holder's wait (its current
step) plus the bytes at the link speed, and is planned only where that is cheaper than the prefill it
saves. The baselines (``round_robin``,
``least_load``, ``sglang_cache_aware``, ``dynamo_cost``) share the interface and the decode choice.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from router.cost_model import DSACostModel


@dataclass(frozen=True)
class RoutingConfig:
    """Knobs of ``DSAServePolicy`` (defaults tuned on the Mooncake trace, see docs/benchmarks.md)."""

    alpha: float = 4.0  # weight of this request's own prefill seconds; > β because a recompute also
    #                     burns cluster capacity and duplicates the prefix in another cache
    beta: float = 1.0  # weight of the seconds of work already queued on the worker
    imbalance_ratio: float = 2.0  # guard when max queued > ratio × min queued ...
    imbalance_floor_s: float = 4.0  # ... and max − min > this: only workers within the band compete
    temperature_s: float = 0.05  # softmax temperature over cost in seconds; 0 = argmin (ties random)
    local_prefill_max_tokens: int = 1024  # conditional disaggregation: ≤ this many uncached tokens ...
    local_prefill_max_queue_tokens: int = 8192  # ... and at most this much local prefill queued there
    decode_headroom_blocks: int = 0  # free blocks a decode worker keeps beyond the request's need
    decode_affinity_slack: float = 0.1  # decode load-score margin within which the prefix holder wins
    peer_pulls: bool = True  # read a prefix from the worker holding it when cheaper than recomputing it
    link_bytes_per_s: float = 25e9  # KV transfer speed between workers, unless the request says measured
    step_tokens: int = 2048  # a holder serves an export after its current engine step (≤ this many tokens)
    cost: DSACostModel = field(default_factory=DSACostModel)

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "temperature_s", "imbalance_floor_s", "decode_affinity_slack"):
            if getattr(self, name) < 0:
                raise ValueError(f"RoutingConfig.{name} must be ≥ 0, got {getattr(self, name)}")
        if self.imbalance_ratio < 1:
            raise ValueError(f"RoutingConfig.imbalance_ratio must be ≥ 1, got {self.imbalance_ratio}")
        if not self.link_bytes_per_s > 0:
            raise ValueError(f"RoutingConfig.link_bytes_per_s must be > 0, got {self.link_bytes_per_s}")


@dataclass(frozen=True)
class RouteRequest:
    prompt_tokens: int
    block_size: int
    max_tokens: int = 0  # decode blocks needed = ceil((prompt + max_tokens) / block_size)
    block_bytes: int = 0  # KV bytes of one block (0: the cost model's estimate)
    link_bytes_per_s: float = 0.0  # measured transfer speed between workers (0: RoutingConfig's)

    @property
    def prompt_blocks(self) -> int:
        return -(-self.prompt_tokens // self.block_size)

    @property
    def decode_blocks(self) -> int:
        return -(-(self.prompt_tokens + self.max_tokens) // self.block_size)

    def cached_tokens(self, matched_blocks: int) -> int:
        """Tokens a worker can skip: its matched blocks, leaving at least one token to compute."""
        return max(0, min(matched_blocks * self.block_size, self.prompt_tokens - 1))


@dataclass(frozen=True)
class PrefillCandidate:
    """A live prefill worker as the router sees it for one request."""

    worker_id: str
    matched_blocks: int = 0  # leading prompt blocks it holds, any tier (KV index)
    queued_tokens: int = 0  # uncached prompt tokens waiting or running on it
    queued_s: float | None = None  # its own estimate of queued work, when it reports one
    running: int = 0  # requests waiting or running on it
    free_blocks: int = 0
    cached_blocks: int = 0  # blocks it holds in all (SGLang's tree size)
    active_blocks: int = 0  # prompt blocks of its waiting and running requests (Dynamo's load)


@dataclass(frozen=True)
class DecodeCandidate:
    """A live decode worker as the router sees it for one request."""

    worker_id: str
    free_blocks: int
    total_blocks: int
    running: int
    matched_blocks: int = 0  # leading prompt blocks it holds (KV index, role decode)
    queued_prefill_tokens: int = 0  # local (conditional) prefills waiting on it


@dataclass(frozen=True)
class PullSource:
    """A live worker holding a leading part of the prompt, which others may read it from."""

    worker_id: str
    matched_blocks: int
    queued_tokens: int = 0  # its engine serves an export after its current step ...
    step_tokens: int = 0  # ... of at most this many tokens (0: RoutingConfig.step_tokens)


@dataclass(frozen=True)
class PeerPull:
    """Read prompt blocks ``first_block .. first_block + num_blocks - 1`` from ``source`` before prefilling."""

    source: str
    first_block: int
    num_blocks: int


@dataclass(frozen=True)
class RouteDecision:
    """Prefill on ``prefill_worker`` (None: on the decode worker itself), then decode on ``decode_worker``;
    ``pull``: blocks the prefill worker first reads from a peer (``expected_cached_tokens`` counts them)."""

    prefill_worker: str | None
    decode_worker: str
    expected_cached_tokens: int
    reason: str
    pull: PeerPull | None = None


class NoCandidates(ValueError):
    """No decode worker was offered: the request cannot be placed."""


class RoutingPolicy(Protocol):
    """Contract: ``route`` returns a decision naming one of the offered workers; it raises
    ``NoCandidates`` only when ``decode`` is empty; with no prefill candidates the decode worker
    prefills. A ``pull`` names one of ``sources`` (never the prefill worker itself) and only blocks that
    source holds beyond the prefill worker's own match. Decisions depend only on the arguments and the
    policy's RNG/counter state; policies that do not pull ignore ``sources``."""

    name: str

    def route(
        self, request: RouteRequest, prefill: Sequence[PrefillCandidate], decode: Sequence[DecodeCandidate],
        sources: Sequence[PullSource] = (),
    ) -> RouteDecision: ...


def softmax_pick(scores: Sequence[float], temperature: float, rng: random.Random) -> int:
    """Index of the chosen score (lower is better): argmin with random ties at temperature 0, else
    sampled with probability ∝ exp(−(score − min) / temperature)."""
    best = min(scores)
    if temperature <= 0:
        ties = [i for i, s in enumerate(scores) if s <= best + 1e-12]
        return ties[rng.randrange(len(ties))]
    weights = [math.exp(-(s - best) / temperature) for s in scores]
    return rng.choices(range(len(scores)), weights=weights)[0]


def choose_decode(
    request: RouteRequest, decode: Sequence[DecodeCandidate], rng: random.Random,
    headroom: int = 0, affinity_slack: float = 0.0,
) -> tuple[DecodeCandidate, bool]:
    """The decode worker with the most free blocks and fewest running sequences (and, within
    ``affinity_slack`` of the best score, the longest held prefix). Returns (worker, has room)."""
    if not decode:
        raise NoCandidates("no decode worker available")
    need = request.decode_blocks + headroom
    roomy = [d for d in decode if d.free_blocks >= need]
    if not roomy:
        return max(decode, key=lambda d: d.free_blocks), False
    most_running = max(d.running for d in roomy) + 1
    scores = [d.running / most_running + 1.0 - d.free_blocks / max(1, d.total_blocks) for d in roomy]
    best = min(scores)
    near = [d for d, s in zip(roomy, scores) if s <= best + affinity_slack]
    top = max(d.matched_blocks for d in near)
    if top > 0:
        near = [d for d in near if d.matched_blocks == top]
    else:
        near = [d for d, s in zip(roomy, scores) if s <= best + 1e-12]
    return near[rng.randrange(len(near))], True


class DSAServePolicy:
    """The cost-based, cache-aware policy described in the module docstring."""

    name = "dsaserve"

    def __init__(self, config: RoutingConfig | None = None, rng: random.Random | None = None) -> None:
        self.config = config or RoutingConfig()
        self.rng = rng or random.Random()

    def queued_s(self, c: PrefillCandidate) -> float:
        return c.queued_s if c.queued_s is not None else c.queued_tokens * self.config.cost.seconds_per_token

    def route(
        self, request: RouteRequest, prefill: Sequence[PrefillCandidate], decode: Sequence[DecodeCandidate],
        sources: Sequence[PullSource] = (),
    ) -> RouteDecision:
        cfg = self.config
        local = self._local_prefill(request, decode)
        if local is not None or not prefill:
            dec = local or choose_decode(request, decode, self.rng, cfg.decode_headroom_blocks)[0]
            reason = "local_prefill" if local is not None else "no_prefill_workers"
            return RouteDecision(None, dec.worker_id, request.cached_tokens(dec.matched_blocks), reason)

        queued = [self.queued_s(c) for c in prefill]
        cached = [request.cached_tokens(c.matched_blocks) for c in prefill]
        own = [cfg.cost.prefill_s(request.prompt_tokens - k, k) for k in cached]
        pulls: list[PeerPull | None] = [None] * len(prefill)
        if cfg.peer_pulls and sources:
            self._plan_pulls(request, prefill, sources, cached, own, pulls)
        scores = [cfg.alpha * o + cfg.beta * q for o, q in zip(own, queued)]
        lo, hi = min(queued), max(queued)
        eligible = list(range(len(prefill)))
        reason = "cost"
        if hi > cfg.imbalance_ratio * lo and hi - lo > cfg.imbalance_floor_s:
            band = max(cfg.imbalance_ratio * lo, lo + cfg.imbalance_floor_s)
            eligible = [i for i in eligible if queued[i] <= band]
            if queued[min(range(len(scores)), key=scores.__getitem__)] > band:
                reason = "imbalance_guard"  # the guard overruled the cheapest worker
        pick = eligible[softmax_pick([scores[i] for i in eligible], cfg.temperature_s, self.rng)]
        if reason == "cost" and cached[pick] > 0 and cached[pick] == max(cached):
            reason = "peer_pull" if pulls[pick] is not None else "cache_hit"
        dec, _ = choose_decode(request, decode, self.rng, cfg.decode_headroom_blocks)
        return RouteDecision(prefill[pick].worker_id, dec.worker_id, cached[pick], reason, pulls[pick])

    def pull_s(self, request: RouteRequest, source: PullSource, blocks: int) -> float:
        """Seconds to read ``blocks`` of the prompt from ``source``: its current step, then the bytes."""
        cfg = self.config
        block_bytes = request.block_bytes or cfg.cost.kv_bytes_per_token * request.block_size
        link = request.link_bytes_per_s or cfg.link_bytes_per_s
        step = min(source.queued_tokens, source.step_tokens or cfg.step_tokens)
        return (cfg.cost.prefill_s(step) if step else 0.0) + blocks * block_bytes / link

    def _plan_pulls(self, request: RouteRequest, prefill: Sequence[PrefillCandidate], sources: Sequence[PullSource],
                    cached: list[int], own: list[float], pulls: list[PeerPull | None]) -> None:
        """Where reading the prefix from its best holder beats computing it, lower ``own`` and
        raise ``cached`` to the pulled prefix and record the pull (in place)."""
        # The two longest holders suffice: the best source for a candidate is the longest one but itself.
        top = sorted((s for s in sources if s.matched_blocks > 0), key=lambda s: (-s.matched_blocks, s.queued_tokens))[:2]
        for i, c in enumerate(prefill):
            src = next((s for s in top if s.worker_id != c.worker_id), None)
            if src is None or src.matched_blocks <= c.matched_blocks:
                continue
            k = request.cached_tokens(src.matched_blocks)
            if k <= cached[i]:
                continue
            moved = src.matched_blocks - c.matched_blocks
            cost = self.config.cost.prefill_s(request.prompt_tokens - k, k) + self.pull_s(request, src, moved)
            if cost < own[i]:
                own[i], cached[i] = cost, k
                pulls[i] = PeerPull(src.worker_id, c.matched_blocks, moved)

    def _local_prefill(self, request: RouteRequest, decode: Sequence[DecodeCandidate]) -> DecodeCandidate | None:
        """Conditional disaggregation: the decode worker (chosen by load, preferring the prefix
        holder) prefills itself when what it lacks is short and it has room and a short local queue."""
        cfg = self.config
        if cfg.local_prefill_max_tokens <= 0 or not decode:
            return None
        dec, room = choose_decode(request, decode, self.rng, cfg.decode_headroom_blocks, cfg.decode_affinity_slack)
        remainder = request.prompt_tokens - request.cached_tokens(dec.matched_blocks)
        short_queue = dec.queued_prefill_tokens <= cfg.local_prefill_max_queue_tokens
        if room and remainder <= cfg.local_prefill_max_tokens and short_queue:
            return dec
        return None


class RoundRobinPolicy:
    """Prefill workers in turn, ignoring caches and load."""

    name = "round_robin"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self._next = 0

    def route(
        self, request: RouteRequest, prefill: Sequence[PrefillCandidate], decode: Sequence[DecodeCandidate],
        sources: Sequence[PullSource] = (),
    ) -> RouteDecision:
        dec, _ = choose_decode(request, decode, self.rng)
        if not prefill:
            return RouteDecision(None, dec.worker_id, 0, "no_prefill_workers")
        c = prefill[self._next % len(prefill)]
        self._next += 1
        return RouteDecision(c.worker_id, dec.worker_id, request.cached_tokens(c.matched_blocks), "round_robin")


class LeastLoadPolicy:
    """The prefill worker with the least queued work (seconds if reported, else tokens)."""

    name = "least_load"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def route(
        self, request: RouteRequest, prefill: Sequence[PrefillCandidate], decode: Sequence[DecodeCandidate],
        sources: Sequence[PullSource] = (),
    ) -> RouteDecision:
        dec, _ = choose_decode(request, decode, self.rng)
        if not prefill:
            return RouteDecision(None, dec.worker_id, 0, "no_prefill_workers")
        loads = [c.queued_s if c.queued_s is not None else float(c.queued_tokens) for c in prefill]
        c = prefill[softmax_pick(loads, 0.0, self.rng)]
        return RouteDecision(c.worker_id, dec.worker_id, request.cached_tokens(c.matched_blocks), "least_load")


class SGLangCacheAwarePolicy:
    """SGLang router's ``cache_aware``: shortest queue (in requests) when max − min > 64 and
    max > 1.5 × min; else the best prefix match if its ratio > 0.3; else the smallest cache. Its
    approximate radix tree is emulated by the worker's actual cached block set."""

    name = "sglang_cache_aware"

    def __init__(self, rng: random.Random | None = None, *, abs_threshold: int = 64,
                 rel_threshold: float = 1.5, match_threshold: float = 0.3) -> None:
        self.rng = rng or random.Random()
        self.abs_threshold, self.rel_threshold, self.match_threshold = abs_threshold, rel_threshold, match_threshold

    def route(
        self, request: RouteRequest, prefill: Sequence[PrefillCandidate], decode: Sequence[DecodeCandidate],
        sources: Sequence[PullSource] = (),
    ) -> RouteDecision:
        dec, _ = choose_decode(request, decode, self.rng)
        if not prefill:
            return RouteDecision(None, dec.worker_id, 0, "no_prefill_workers")
        loads = [c.running for c in prefill]
        if max(loads) - min(loads) > self.abs_threshold and max(loads) > self.rel_threshold * min(loads):
            i, reason = softmax_pick(loads, 0.0, self.rng), "imbalance"
        else:
            ratios = [request.cached_tokens(c.matched_blocks) / max(1, request.prompt_tokens) for c in prefill]
            if max(ratios) > self.match_threshold:
                i, reason = softmax_pick([-r for r in ratios], 0.0, self.rng), "cache_hit"
            else:
                i, reason = softmax_pick([c.cached_blocks for c in prefill], 0.0, self.rng), "smallest_tree"
        c = prefill[i]
        return RouteDecision(c.worker_id, dec.worker_id, request.cached_tokens(c.matched_blocks), reason)


class DynamoCostPolicy:
    """Dynamo's KV router: ``cost = w · uncached prompt blocks + active blocks``, w = 1, argmin."""

    name = "dynamo_cost"

    def __init__(self, rng: random.Random | None = None, *, prefill_weight: float = 1.0) -> None:
        self.rng = rng or random.Random()
        self.prefill_weight = prefill_weight

    def route(
        self, request: RouteRequest, prefill: Sequence[PrefillCandidate], decode: Sequence[DecodeCandidate],
        sources: Sequence[PullSource] = (),
    ) -> RouteDecision:
        dec, _ = choose_decode(request, decode, self.rng)
        if not prefill:
            return RouteDecision(None, dec.worker_id, 0, "no_prefill_workers")
        costs = [self.prefill_weight * max(0, request.prompt_blocks - c.matched_blocks) + c.active_blocks
                 for c in prefill]
        c = prefill[softmax_pick(costs, 0.0, self.rng)]
        return RouteDecision(c.worker_id, dec.worker_id, request.cached_tokens(c.matched_blocks), "cost")


POLICIES = ("dsaserve", "round_robin", "least_load", "sglang_cache_aware", "dynamo_cost")


def make_policy(name: str, config: RoutingConfig | None = None, rng: random.Random | None = None) -> RoutingPolicy:
    """A policy by name (``POLICIES``); ``config`` applies to ``dsaserve`` only."""
    if name == "dsaserve":
        return DSAServePolicy(config, rng)
    classes = {"round_robin": RoundRobinPolicy, "least_load": LeastLoadPolicy,
               "sglang_cache_aware": SGLangCacheAwarePolicy, "dynamo_cost": DynamoCostPolicy}
    if name not in classes:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}")
    return classes[name](rng)
