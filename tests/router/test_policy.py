"""The routing policy: the DSA cost model, dsaserve's choices, and the baselines' documented rules."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from router.policy import (
    POLICIES,
    DecodeCandidate,
    DSACostModel,
    DSAServePolicy,
    NoCandidates,
    PeerPull,
    PrefillCandidate,
    PullSource,
    RouteRequest,
    RoutingConfig,
    choose_decode,
    make_policy,
    softmax_pick,
)

BS = 64
COST = DSACostModel()


def prefill(n: int, **overrides: dict) -> list[PrefillCandidate]:
    """``n`` idle, cache-less workers p0..p{n-1}; ``overrides`` maps a worker id to field values."""
    return [PrefillCandidate(f"p{i}", **overrides.get(f"p{i}", {})) for i in range(n)]


def decode(n: int = 2, free: int = 1000, **overrides: dict) -> list[DecodeCandidate]:
    return [DecodeCandidate(f"d{i}", **{"free_blocks": free, "total_blocks": 1000, "running": 0,
                                        **overrides.get(f"d{i}", {})}) for i in range(n)]


def policy(seed: int = 0, **config) -> DSAServePolicy:
    return DSAServePolicy(RoutingConfig(**config), random.Random(seed))


# ---------------------------------------------------------------------------------------------- cost model
def test_cost_grows_with_new_tokens_and_context():
    times = [COST.prefill_s(n) for n in (1, 512, 4096, 32768, 131072)]
    assert times == sorted(times) and len(set(times)) == len(times)
    # the same 1024 new tokens cost more after a longer cached prefix (indexer + attention context) ...
    after = [COST.prefill_s(1024, c) for c in (0, 8192, 65536)]
    assert after == sorted(after)
    # ... but a cached prefix always beats recomputing it
    assert COST.prefill_s(1024, 8192) < COST.prefill_s(8192 + 1024)


def test_indexer_part_is_quadratic_and_attention_capped_at_topk():
    _, attn1, idx1 = COST.flops(16384)
    _, attn2, idx2 = COST.flops(32768)
    assert idx2 / idx1 == pytest.approx(4.0, rel=1e-3)
    assert attn2 / attn1 == pytest.approx(2.0, rel=0.07)  # linear once context > index_topk
    lin, _, _ = COST.flops(1)
    assert lin == pytest.approx(2 * 37e9, rel=0.02)  # ≈ 37B active parameters per token


def test_cost_model_reads_a_model_config():
    from workers.model.presets import PRESETS

    tiny = DSACostModel.from_model_config(PRESETS["tiny"], linear_flops_per_s=1e12)
    assert tiny.index_topk == PRESETS["tiny"].index_topk and tiny.linear_flops_per_s == 1e12
    assert tiny.linear_flops_per_token < COST.linear_flops_per_token


# ---------------------------------------------------------------------------------------------- dsaserve
def test_picks_the_worker_holding_the_prefix():
    req = RouteRequest(12 * BS + 10, BS)
    d = policy(local_prefill_max_tokens=0).route(req, prefill(4, p2={"matched_blocks": 10}), decode())
    assert (d.prefill_worker, d.expected_cached_tokens, d.reason) == ("p2", 10 * BS, "cache_hit")


def test_queued_work_outweighs_a_small_hit():
    req = RouteRequest(40 * BS, BS)
    workers = prefill(2, p0={"matched_blocks": 2, "queued_s": 3.0})
    assert policy(local_prefill_max_tokens=0).route(req, workers, decode()).prefill_worker == "p1"


def test_imbalance_guard_moves_load_off_the_holder():
    # a 120K prompt: recomputing it costs more than the holder's 12 s queue, so cost alone would
    # pile onto the holder; the guard (spread > 2× and > 4 s) sends it to the least-loaded side
    req = RouteRequest(1900 * BS, BS)
    overloaded = prefill(3, p0={"matched_blocks": 1899, "queued_s": 12.0}, p1={"queued_s": 0.5})
    d = policy(local_prefill_max_tokens=0).route(req, overloaded, decode())
    assert d.prefill_worker == "p2" and d.reason == "imbalance_guard"
    assert policy(local_prefill_max_tokens=0, imbalance_floor_s=1e9).route(req, overloaded, decode()).prefill_worker == "p0"
    within = prefill(3, p0={"matched_blocks": 1899, "queued_s": 3.0}, p1={"queued_s": 0.5})
    assert policy(local_prefill_max_tokens=0).route(req, within, decode()).prefill_worker == "p0"


def test_ties_are_broken_by_the_seeded_rng():
    req = RouteRequest(4096, BS)

    def picks(seed: int) -> list[str]:
        p = policy(seed, local_prefill_max_tokens=0)
        return [p.route(req, prefill(4), decode()).prefill_worker for _ in range(40)]

    assert picks(7) == picks(7)
    assert picks(7) != picks(8)
    assert set(picks(7)) == {"p0", "p1", "p2", "p3"}  # identical workers share the load


def test_softmax_pick():
    rng = random.Random(0)
    assert softmax_pick([3.0, 1.0, 2.0], 0.0, rng) == 1
    counts = Counter(softmax_pick([1.0, 1.0 + 1e-3, 5.0], 0.05, rng) for _ in range(2000))
    assert counts[2] == 0 and abs(counts[0] - counts[1]) < 300  # near-ties share, far costs lose


def test_conditional_disaggregation_for_short_uncached_prompts():
    p = policy(local_prefill_max_tokens=512)
    short = p.route(RouteRequest(300, BS, max_tokens=50), prefill(2), decode())
    assert short.prefill_worker is None and short.reason == "local_prefill"
    long = p.route(RouteRequest(5000, BS), prefill(2), decode())
    assert long.prefill_worker is not None
    # a long prompt whose prefix the decode worker already holds: only the short remainder is computed
    held = p.route(RouteRequest(5000, BS), prefill(2), decode(2, d1={"matched_blocks": 74}))
    assert (held.prefill_worker, held.decode_worker, held.expected_cached_tokens) == (None, "d1", 74 * BS)
    # no room, a long local queue, or the feature off: disaggregate as usual
    assert p.route(RouteRequest(300, BS), prefill(2), decode(2, free=1)).prefill_worker is not None
    busy = decode(2, d0={"queued_prefill_tokens": 10**6}, d1={"queued_prefill_tokens": 10**6})
    assert p.route(RouteRequest(300, BS), prefill(2), busy).prefill_worker is not None
    off = policy(local_prefill_max_tokens=0)
    assert off.route(RouteRequest(300, BS), prefill(2), decode()).prefill_worker is not None


def test_decode_chosen_by_free_blocks_and_running():
    rng = random.Random(0)
    req = RouteRequest(1000, BS, max_tokens=100)
    ds = decode(3, d0={"free_blocks": 100}, d1={"running": 50}, d2={"running": 10})
    assert choose_decode(req, ds, rng) == (ds[2], True)
    full = decode(2, d0={"free_blocks": 5}, d1={"free_blocks": 9})
    assert choose_decode(req, full, rng) == (full[1], False)
    with pytest.raises(NoCandidates):
        policy().route(req, prefill(1), [])
    assert policy().route(RouteRequest(9000, BS), [], decode()).prefill_worker is None


def test_config_is_validated():
    with pytest.raises(ValueError, match="alpha"):
        RoutingConfig(alpha=-1)
    with pytest.raises(ValueError, match="imbalance_ratio"):
        RoutingConfig(imbalance_ratio=0.5)


# ---------------------------------------------------------------------------------------------- baselines
def test_round_robin_cycles():
    p = make_policy("round_robin", rng=random.Random(0))
    assert [p.route(RouteRequest(100, BS), prefill(3), decode()).prefill_worker for _ in range(4)] == ["p0", "p1", "p2", "p0"]


def test_least_load_picks_the_shortest_queue():
    p = make_policy("least_load", rng=random.Random(0))
    ws = prefill(3, p0={"queued_tokens": 500, "matched_blocks": 9}, p1={"queued_tokens": 100}, p2={"queued_tokens": 300})
    assert p.route(RouteRequest(640, BS), ws, decode()).prefill_worker == "p1"


def test_sglang_cache_aware_rules():
    p = make_policy("sglang_cache_aware", rng=random.Random(0))
    req = RouteRequest(10 * BS, BS)
    # imbalance (max − min > 64 and max > 1.5 × min): shortest queue, cache ignored
    ws = prefill(3, p0={"running": 100, "matched_blocks": 10}, p1={"running": 20}, p2={"running": 30})
    assert p.route(req, ws, decode()).prefill_worker == "p1"
    # balanced and a match ratio > 0.3: best match, however loaded
    ws = prefill(3, p0={"running": 60, "matched_blocks": 4}, p1={"matched_blocks": 2})
    assert p.route(req, ws, decode()).prefill_worker == "p0"
    # balanced, ratio ≤ 0.3: the smallest tree
    ws = prefill(3, p0={"matched_blocks": 3, "cached_blocks": 50}, p1={"cached_blocks": 90}, p2={"cached_blocks": 10})
    assert p.route(req, ws, decode()).prefill_worker == "p2"


def test_dynamo_cost_is_uncached_plus_active_blocks():
    p = make_policy("dynamo_cost", rng=random.Random(0))
    req = RouteRequest(10 * BS, BS)  # 10 blocks
    ws = prefill(3, p0={"matched_blocks": 8, "active_blocks": 9},  # 2 + 9 = 11
                 p1={"matched_blocks": 0, "active_blocks": 0},  # 10 + 0 = 10
                 p2={"matched_blocks": 6, "active_blocks": 3})  # 4 + 3 = 7
    assert p.route(req, ws, decode()).prefill_worker == "p2"


def test_every_named_policy_exists():
    for name in POLICIES:
        assert make_policy(name).name == name
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("fastest")


# ---------------------------------------------------------------------------------------------- peer pulls
def test_a_busy_holder_is_bypassed_by_pulling_its_prefix():
    """p0 holds 64 blocks (4096 tokens) but has minutes of work queued; p1 reads the blocks from it
    (a 25 GB/s link moves V3.2's 64 blocks of 3 MB in ~8 ms) instead of computing them."""
    req = RouteRequest(4096 + 100, BS, 16)
    cands = prefill(2, p0={"matched_blocks": 64, "queued_s": 60.0})
    d = policy(temperature_s=0.0).route(req, cands, decode(), sources=[PullSource("p0", 64, queued_tokens=2048)])
    assert d.prefill_worker == "p1" and d.reason == "peer_pull"
    assert d.pull == PeerPull("p0", first_block=0, num_blocks=64) and d.expected_cached_tokens == 4096


def test_a_pull_only_moves_what_the_puller_lacks_and_never_from_itself():
    req = RouteRequest(4096 + 100, BS, 16)
    cands = prefill(2, p0={"matched_blocks": 64, "queued_s": 60.0}, p1={"matched_blocks": 10})
    sources = [PullSource("p0", 64), PullSource("p1", 10)]
    d = policy(temperature_s=0.0).route(req, cands, decode(), sources=sources)
    assert d.pull == PeerPull("p0", first_block=10, num_blocks=54)
    idle = prefill(2, p0={"matched_blocks": 64})  # the holder is idle: it runs the request itself
    d = policy(temperature_s=0.0).route(req, idle, decode(), sources=sources)
    assert d.prefill_worker == "p0" and d.pull is None


def test_no_pull_when_moving_the_bytes_costs_more_than_computing_them():
    req = RouteRequest(4096 + 100, BS, 16, link_bytes_per_s=1e6)  # 1 MB/s: 200 s for 64 blocks
    cands = prefill(2, p0={"matched_blocks": 64, "queued_s": 60.0})
    d = policy(temperature_s=0.0).route(req, cands, decode(), sources=[PullSource("p0", 64)])
    assert d.prefill_worker == "p1" and d.pull is None and d.expected_cached_tokens == 0
    off = policy(temperature_s=0.0, peer_pulls=False).route(RouteRequest(4096 + 100, BS, 16), cands, decode(),
                                                             sources=[PullSource("p0", 64)])
    assert off.pull is None


def test_pull_cost_counts_the_holders_current_step_and_the_bytes():
    p = policy()
    req = RouteRequest(4096, BS, block_bytes=10**6, link_bytes_per_s=1e9)
    assert p.pull_s(req, PullSource("p0", 8), 8) == pytest.approx(8e-3)
    busy = p.pull_s(req, PullSource("p0", 8, queued_tokens=10**6), 8)
    assert busy == pytest.approx(8e-3 + COST.prefill_s(p.config.step_tokens))
