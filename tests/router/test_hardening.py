"""No request can hurt another, in local mode: the bad-input battery, configurable limits reported by
ListModels, overload with cancellations, duplicate client ids across two routers, per-tenant prefix
caches, and health that follows the engines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cluster.local import LocalBackend
from router.client import Client, DsaServeError
from router.frontend import CompletionRequest, Frontend
from router.limits import RequestLimits
from router.tokenizer import Tokenizer
from tests.battery import GOOD, GOOD_IDS, overload, run_battery
from tests.router.conftest import MAX_MODEL_LEN, ServerThread
from tests.router.test_frontend import greedy
from workers.engine.config import EngineConfig

LIMITS = RequestLimits(max_stop_strings=3, max_stop_string_chars=40, max_stop_token_ids=5, max_request_id_chars=32,
                       max_cache_salt_chars=24, max_prompt_chars=3000, max_message_bytes=64 * 1024)
QUEUE = 4


@pytest.fixture(scope="module")
def limited(tiny_dir: Path, tokenizer: Tokenizer) -> Iterator[ServerThread]:
    """A disaggregated server with small, non-default limits and an admission queue of ``QUEUE``."""
    config = EngineConfig(max_model_len=MAX_MODEL_LEN, num_blocks=128, max_queue=QUEUE)
    with LocalBackend.start(tiny_dir, engine_config=config, limits=LIMITS) as backend:
        st = ServerThread(backend, tokenizer)
        yield st
        st.stop()


def reference(address: str) -> tuple[int, ...]:
    with Client(address, timeout=60) as c:
        return c.generate(prompt_ids=GOOD_IDS, **GOOD).token_ids


def test_list_models_reports_the_configured_limits(limited: ServerThread) -> None:
    with Client(limited.address, timeout=30) as c:
        (model,) = c.list_models()
    assert model.limits == LIMITS.resolved(max_context=MAX_MODEL_LEN, max_queue=QUEUE)
    assert model.limits.max_concurrent_streams == QUEUE + 64 and model.max_queue == QUEUE


def test_default_limits_are_reported(server: ServerThread) -> None:
    with Client(server.address, timeout=30) as c:
        (model,) = c.list_models()
    assert model.limits == RequestLimits().resolved(max_context=MAX_MODEL_LEN, max_queue=model.max_queue)
    assert model.limits.max_prompt_chars == 2**20 and model.limits.max_message_bytes == 4 * 2**20


def test_bad_input_battery(limited: ServerThread) -> None:
    ref = reference(limited.address)
    with grpc.insecure_channel(limited.address) as channel:
        problems = run_battery(channel, ref)
    assert not problems, "\n".join(problems)
    wait_idle(limited.backend)


def test_overload_answers_resource_exhausted_and_frees_everything(limited: ServerThread) -> None:
    """10× the queue limit of concurrent streams, a third of them cancelled after their first delta:
    each completes or gets RESOURCE_EXHAUSTED with retry pushback; then every block is free."""
    ref = reference(limited.address)
    outcomes = asyncio.run(overload(limited.address, 10 * QUEUE, ref, timeout=120))
    assert outcomes["done"] + outcomes["cancelled"] + outcomes["rejected"] == 10 * QUEUE, outcomes
    assert outcomes["rejected"] > 0 and outcomes["done"] > 0, outcomes
    assert outcomes["pushback_missing"] == outcomes["wrong_tokens"] == outcomes["other_errors"] == 0, outcomes
    wait_idle(limited.backend)
    with Client(limited.address, timeout=30) as c:
        assert c.health() == "SERVING"
        assert c.generate(prompt_ids=GOOD_IDS, **GOOD).token_ids == ref
    assert limited.backend.stats()["router"]["rejected_total"] == outcomes["rejected"]


def test_duplicate_client_ids_across_two_routers_do_not_cross(tiny_dir: Path, tokenizer: Tokenizer) -> None:
    """Two routers (Frontends) share one set of engines and see the same client id at once: the engines
    key requests by server-made ids, so each caller gets its own prompt's tokens and no lease leaks."""
    config = EngineConfig(max_model_len=MAX_MODEL_LEN, num_blocks=64)
    prompts = [(0, 500, 600, 700, 800), (0, 9000, 9100, 9200)]
    with LocalBackend.start(tiny_dir, engine_config=config) as backend:
        routers = [Frontend(backend, tokenizer) for _ in prompts]

        async def run(router: Frontend, ids: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
            out = await router.complete(CompletionRequest(prompt_ids=ids, params=greedy(16), request_id="same"))
            return out.request_id, out.token_ids

        async def alone() -> list:
            return [await run(routers[0], ids) for ids in prompts]

        async def together() -> list:
            return list(await asyncio.gather(*(run(r, ids) for r, ids in zip(routers, prompts))))

        solo = asyncio.run(alone())
        both = asyncio.run(together())
        assert both == solo and all(rid == "same" for rid, _ in both)
        assert solo[0][1] != solo[1][1]
        wait_idle(backend)


def test_prefix_cache_is_isolated_per_api_key(tiny_dir: Path, tokenizer: Tokenizer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With keys configured, a tenant's repeated prompt hits its own cache; another tenant's identical
    prompt computes everything (cached_tokens reveals nothing across keys)."""
    monkeypatch.setenv("DSASERVE_API_KEYS", "key-a,key-b")
    config = EngineConfig(max_model_len=MAX_MODEL_LEN, num_blocks=64, block_size=16)
    ids = list(range(100, 160))
    with LocalBackend.start(tiny_dir, engine_config=config) as backend:
        st = ServerThread(backend, tokenizer)
        try:
            def cached(key: str, salt: str | None = None) -> int:
                with Client(st.address, timeout=60, api_key=key) as c:
                    return c.generate(prompt_ids=ids, max_tokens=2, cache_salt=salt).usage.cached_tokens

            assert cached("key-a") == 0
            assert cached("key-a") >= 48  # the same tenant reuses its blocks
            assert cached("key-b") == 0  # another tenant does not see them
            assert cached("key-b", "x") == 0 and cached("key-b", "x") >= 48  # salts still split a tenant
        finally:
            st.stop()


def test_health_follows_the_engines(tiny_dir: Path, tokenizer: Tokenizer) -> None:
    """NOT_SERVING while the engine loop is down, SERVING again once it serves."""
    config = EngineConfig(max_model_len=MAX_MODEL_LEN, num_blocks=64)
    with LocalBackend.start(tiny_dir, engine_config=config) as backend:
        st = ServerThread(backend, tokenizer)
        try:
            with Client(st.address, timeout=30) as c:
                assert c.health() == "SERVING"
                backend.loop.stop()
                assert _wait_for(lambda: c.health() == "NOT_SERVING")
                with pytest.raises(DsaServeError) as err:
                    c.generate(prompt_ids=GOOD_IDS, **GOOD)
                assert err.value.code == grpc.StatusCode.UNAVAILABLE
        finally:
            st.stop()


def wait_idle(backend: LocalBackend, timeout: float = 10.0) -> None:
    """Every request ended and every KV block of every engine is free (leases and imports included)."""

    def idle() -> bool:
        stats = backend.stats()
        return stats["router"]["in_flight"] == 0 and all(
            w.free_blocks == w.total_blocks and w.running == 0 and w.waiting == 0 for w in stats["workers"]
        ) and not any(len(e.leases) for e in (backend.prefill_engine, backend.decode_engine) if e is not None)

    assert _wait_for(idle, timeout), backend.stats()


def _wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()
