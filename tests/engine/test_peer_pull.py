"""Peer pulls between two real engines (LocalTransfer): a worker reads a prompt's prefix that another
worker holds (device pool or host tier) instead of computing it, and produces the reference tokens;
a pull that cannot be trusted (other hashes, an expired lease, blocks reused) or cannot be read is
refused and the prefix is computed — same tokens. Concurrent requests sharing a prefix on one engine
compute it once."""

from __future__ import annotations

import time

import pytest

from kvstore.hashing import block_hashes
from kvstore.transfer import LocalTransfer
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.peer import export_id
from workers.engine.types import GenerateRequest, KVHandle, RequestOutput, SamplingParams
from workers.model import load_model

from .conftest import prompt, reference_greedy

BS = 16
N = 5


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt)


def _engines(model, **cfg):
    transfer = LocalTransfer()
    config = EngineConfig(num_blocks=cfg.pop("num_blocks", 32), block_size=BS, **cfg)
    a, b = (Engine(model, config, worker_id=w, model_id="m", transfer=transfer,
                   holder_factory=lambda storage, w=w: transfer.holder(w, storage)) for w in ("a", "b"))
    return a, b, transfer


def _req(rid: str, ids) -> GenerateRequest:
    return GenerateRequest(rid, tuple(ids), SamplingParams(max_tokens=N, ignore_eos=True))


def _run(engine: Engine, request: GenerateRequest, prefix: KVHandle | None = None) -> list[RequestOutput]:
    outs: list[RequestOutput] = []
    engine.add_request(request, outs.append, prefix)
    for _ in range(200):
        if outs and outs[-1].finished:
            return outs
        engine.step()
    raise AssertionError("request did not finish")


def _export(engine: Engine, rid: str, ids, first_block: int = 0) -> KVHandle | None:
    hashes = block_hashes(ids[:-1], model_id="m", block_size=BS)[first_block:]
    got: list = []
    engine.export_prefix(rid, hashes, first_block, got.append)
    engine.step()
    assert len(got) == 1
    return got[0]


def _tokens(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def test_a_pulled_prefix_is_not_computed_and_gives_the_reference_tokens(model):
    a, b, transfer = _engines(model)
    shared = prompt(8 * BS, seed=1)
    first, second = shared + prompt(7, seed=2), shared + prompt(9, seed=3)
    _run(a, _req("r1", first))
    handle = _export(a, "r2", second)
    assert handle is not None and len(handle.block_ids) == 8 and handle.first_block == 0
    assert len(a.leases) == 1  # the exported blocks are leased until read or released
    outs = _run(b, _req("r2", second), handle)
    assert outs[-1].usage.cached_tokens == 8 * BS and outs[-1].finish_reason == "length"
    assert _tokens(outs) == reference_greedy(model, second, N)
    assert b.stats().peer_pulls["pulled_blocks"] == 8 and b.peers.pulled_bytes == 8 * b.layout.bytes_per_block
    assert a.stats().peer_pulls["exported_blocks"] == 8
    a.release(export_id("r2"))
    a.step()
    assert not len(a.leases) and a.pool.num_free == a.pool.num_blocks
    assert b.pool.num_free == b.pool.num_blocks  # the held references went with the request


def test_only_the_missing_blocks_are_read(model):
    a, b, transfer = _engines(model)
    shared = prompt(6 * BS, seed=4)
    _run(a, _req("r1", shared + prompt(3, seed=5)))
    _run(b, _req("rb", shared[: 2 * BS] + prompt(3, seed=6)))  # b already holds the first two blocks
    second = shared + prompt(5, seed=7)
    before = transfer.stats()["bytes"]
    outs = _run(b, _req("r2", second), _export(a, "r2", second))
    assert outs[-1].usage.cached_tokens == 6 * BS and _tokens(outs) == reference_greedy(model, second, N)
    assert b.peers.pulled_blocks == 4 and transfer.stats()["bytes"] - before == 4 * b.layout.bytes_per_block


def test_host_tier_blocks_are_exported_too(model):
    a, b, _ = _engines(model, num_blocks=8, host_cache_blocks=16)
    shared = prompt(4 * BS, seed=8)
    _run(a, _req("r1", shared + prompt(3, seed=9)))
    _run(a, _req("evict", prompt(7 * BS, seed=10)))  # pushes the shared blocks to the host tier
    assert a.pool.lookup(block_hashes(shared, model_id="m", block_size=BS)) == []
    second = shared + prompt(4, seed=11)
    handle = _export(a, "r2", second)
    assert handle is not None and len(handle.block_ids) == 4
    outs = _run(b, _req("r2", second), handle)
    assert outs[-1].usage.cached_tokens == 4 * BS and _tokens(outs) == reference_greedy(model, second, N)


@pytest.mark.parametrize("fault", ["other_prompt", "expired", "reused"])
def test_an_untrustworthy_pull_is_refused_and_the_prefix_computed(model, fault):
    a, b, transfer = _engines(model, lease_s=0.001 if fault == "expired" else 30.0)
    shared = prompt(4 * BS, seed=12)
    _run(a, _req("r1", shared + prompt(3, seed=13)))
    second = shared + prompt(6, seed=14)
    handle = _export(a, "r2", (prompt(4 * BS, seed=15) + (1,)) if fault == "other_prompt" else second)
    if fault == "other_prompt":
        assert handle is None  # a holds none of that prompt
        _run(a, _req("r3", prompt(4 * BS, seed=15) + (1, 2)))
        handle = _export(a, "r2", prompt(4 * BS, seed=15) + (1,))
    if fault == "expired":
        time.sleep(0.01)
    if fault == "reused":
        a.release(handle.request_id)
        a.step()
        _run(a, _req("r4", prompt(30 * BS, seed=16)))  # takes every block, the exported ones included
    outs = _run(b, _req("r2", second), handle)
    assert outs[-1].usage.cached_tokens == 0 and _tokens(outs) == reference_greedy(model, second, N)
    assert b.peers.pull_failures == 1 and b.peers.pulled_blocks == 0
    assert b.pool.num_free == b.pool.num_blocks


def test_export_of_a_prefix_it_does_not_hold_is_none(model):
    a, _, _ = _engines(model)
    assert _export(a, "r", prompt(3 * BS, seed=17)) is None
    assert not len(a.leases)


def test_concurrent_requests_sharing_a_prefix_compute_it_once(model):
    a, _, _ = _engines(model)
    shared = prompt(5 * BS, seed=18)
    prompts = [shared + prompt(4, seed=20 + i) for i in range(4)]
    outs: dict[str, list] = {f"r{i}": [] for i in range(4)}
    for i, p in enumerate(prompts):
        a.add_request(_req(f"r{i}", p), outs[f"r{i}"].append)
    for _ in range(100):
        if all(o and o[-1].finished for o in outs.values()):
            break
        a.step()
    cached = sorted(o[-1].usage.cached_tokens for o in outs.values())
    assert cached == [0, 5 * BS, 5 * BS, 5 * BS]
    for i, p in enumerate(prompts):
        assert _tokens(outs[f"r{i}"]) == reference_greedy(model, p, N)
