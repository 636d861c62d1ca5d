"""gRPC over a real server on a real LocalBackend (tiny checkpoint, greedy, small max_tokens)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from router.client import AsyncClient, Client, DsaServeError
from router.tokenizer import Tokenizer
from tests.engine.test_stats import KV_TRANSFER_KEYS, OPTIONAL_WORKER_KEYS, WORKER_KEYS
from tests.router.conftest import MAX_MODEL_LEN, ServerThread

NUM_PROMPTS = 20
GREEDY = {"max_tokens": 4, "ignore_eos": True}


def prompt_ids(i: int) -> list[int]:
    return [0, 100 + 37 * i, 5000 + i, 42]


@pytest.fixture(scope="module")
def client(server: ServerThread):
    with Client(server.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def solo(client: Client) -> dict[int, tuple[int, ...]]:
    """Each prompt's greedy tokens when it runs alone: the reference for concurrent runs."""
    return {i: client.generate(prompt_ids=prompt_ids(i), **GREEDY).token_ids for i in range(NUM_PROMPTS)}


def wait_idle(server: ServerThread, timeout: float = 10.0) -> dict:
    """Wait until the backend has no request in flight and every KV block is free again."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.backend.stats()
        idle = stats["router"]["in_flight"] == 0 and all(w.free_blocks == w.total_blocks for w in stats["workers"])
        if idle or time.monotonic() > deadline:
            assert idle, stats
            return stats
        time.sleep(0.05)


def test_health_reflection_and_models(client: Client, server: ServerThread) -> None:
    assert client.health() == "SERVING"
    assert client.health("dsaserve.v1.DsaServe") == "SERVING"
    with grpc.insecure_channel(server.address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "dsaserve.v1.DsaServe" in services and "grpc.health.v1.Health" in services
    (model,) = client.list_models()
    assert model.max_context == MAX_MODEL_LEN and model.vocab_size == 129280 and model.has_tokenizer
    assert (model.block_size, model.index_topk) == (64, 32) and model.max_queue >= 1 and model.max_tokens_limit >= 1


def test_status_keeps_the_cli_keys(client: Client) -> None:
    client.generate(prompt_ids=prompt_ids(0), **GREEDY)
    status = client.status()
    assert status["mode"] == "local" and {w["role"] for w in status["workers"]} == {"prefill", "decode"}
    for w in status["workers"]:
        assert WORKER_KEYS <= set(w) <= WORKER_KEYS | OPTIONAL_WORKER_KEYS and set(w["kv_transfer"]) == KV_TRANSFER_KEYS, w
        assert w["kv_transfer"]["backend"] == "local" and w["requests_total"] >= 1 and w["healthy"]


def test_tokenize_matches_the_tokenizer(client: Client, tokenizer: Tokenizer) -> None:
    text = "深度求索 DeepSeek 🎉"
    assert client.tokenize(text) == tokenizer.encode(text)


def test_streaming_equals_non_streaming(client: Client, tokenizer: Tokenizer) -> None:
    kwargs = {"max_tokens": 8, "ignore_eos": True}
    whole = client.generate("The capital of France is", **kwargs)
    deltas = list(client.generate_stream("The capital of France is", **kwargs))
    assert [t for d in deltas for t in d.token_ids] == list(whole.token_ids)
    assert "".join(d.text for d in deltas) == whole.text == tokenizer.decode(whole.token_ids)
    assert deltas[-1].finished and whole.finish_reason == "length" and len(whole.token_ids) == 8
    assert whole.usage.prompt_tokens == len(tokenizer.encode("The capital of France is"))
    assert whole.usage.completion_tokens == 8 and whole.ttft_s is not None and whole.ttft_s > 0


def test_stop_string_over_grpc(client: Client, server: ServerThread) -> None:
    full = client.generate("Once upon a time", max_tokens=12, ignore_eos=True)
    stop = full.text[len(full.text) // 2 :][:2]
    cut = client.generate("Once upon a time", max_tokens=12, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert len(cut.token_ids) < 12
    wait_idle(server)


def test_32_concurrent_streams(server: ServerThread, solo: dict[int, tuple[int, ...]]) -> None:
    async def run() -> list[tuple[int, ...]]:
        async with AsyncClient(server.address, timeout=60) as c:

            async def one(i: int) -> tuple[int, ...]:
                return tuple(
                    [
                        t
                        async for d in c.generate_stream(prompt_ids=prompt_ids(i % NUM_PROMPTS), **GREEDY)
                        for t in d.token_ids
                    ]
                )

            return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(run())
    assert results == [solo[i % NUM_PROMPTS] for i in range(32)]


def test_batch_of_200_with_bad_requests(client: Client, server: ServerThread, solo: dict[int, tuple[int, ...]]) -> None:
    requests = [{"id": f"r{i}", "prompt_ids": prompt_ids(i % NUM_PROMPTS), **GREEDY} for i in range(200)]
    requests[17:17] = [{"id": "bad-empty", "prompt_ids": []}]
    requests[90:90] = [{"id": "bad-temp", "prompt_ids": [5], "temperature": -1.0}]
    requests[150:150] = [{"id": "bad-vocab", "prompt_ids": [5, 10**6]}]
    requests[199:199] = [{"id": "bad-type", "prompt_ids": [5], "max_tokens": "3"}]  # rejected by the client
    results = {r.request_id: r for r in client.generate_batch(requests)}
    assert len(results) == 204
    bad = [
        ("bad-empty", "prompt_ids"),
        ("bad-temp", "temperature"),
        ("bad-vocab", "prompt_ids"),
        ("bad-type", "max_tokens"),
    ]
    for rid, field in bad:
        err = results.pop(rid).error
        assert err is not None and err.code == grpc.StatusCode.INVALID_ARGUMENT and err.field == field
    for i in range(200):
        r = results[f"r{i}"]
        assert r.error is None and r.completion is not None
        assert r.completion.token_ids == solo[i % NUM_PROMPTS] and r.completion.finish_reason == "length"
    wait_idle(server)


BAD_INPUTS = [
    ("empty-prompt", {"prompt": ""}, "prompt", "empty"),
    ("empty-ids", {"prompt_ids": []}, "prompt_ids", "empty"),
    ("id-ge-vocab", {"prompt_ids": [5, 129280]}, "prompt_ids", "[0, 129280)"),
    ("over-context", {"prompt_ids": [5] * 100, "max_tokens": 200}, "max_tokens", str(MAX_MODEL_LEN)),
    ("negative-temperature", {"prompt_ids": [5], "temperature": -0.1}, "temperature", "[0, 100]"),
    ("top-p-zero", {"prompt_ids": [5], "top_p": 0.0}, "top_p", "(0, 1]"),
]


@pytest.mark.parametrize("kwargs,field,limit", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_invalid_argument_and_server_keeps_serving(
    client: Client, kwargs: dict, field: str, limit: str
) -> None:
    with pytest.raises(DsaServeError) as info:
        client.generate(**kwargs)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field == field and limit in info.value.message
    assert len(client.generate(prompt_ids=[5, 6], max_tokens=2).token_ids) >= 1


def test_text_prompt_without_tokenizer(small_queue_server: ServerThread) -> None:
    with Client(small_queue_server.address, timeout=60) as c:
        assert not c.list_models()[0].has_tokenizer
        with pytest.raises(DsaServeError) as info:
            c.generate("Hello")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.field == "prompt"
        with pytest.raises(DsaServeError) as info:
            c.tokenize("Hello")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.field == "text"
        out = c.generate(prompt_ids=[0, 5, 6], max_tokens=3, ignore_eos=True)
        assert len(out.token_ids) == 3 and out.text == ""


def test_queue_full_is_resource_exhausted(small_queue_server: ServerThread) -> None:
    with Client(small_queue_server.address, timeout=60) as c:
        running = c.generate_stream(prompt_ids=[0, 5], max_tokens=200, ignore_eos=True)
        next(running)  # admitted: the queue of one is full now
        with pytest.raises(DsaServeError) as info:
            c.generate(prompt_ids=[0, 7], max_tokens=2)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.retry_after_s and "retry" in info.value.message
        running.close()  # cancels the call: the request is aborted and its blocks freed
        wait_idle(small_queue_server)
        assert len(c.generate(prompt_ids=[0, 7], max_tokens=2, ignore_eos=True).token_ids) == 2


def test_deadline_exceeded_frees_the_request(client: Client, server: ServerThread) -> None:
    start = time.monotonic()
    with pytest.raises(DsaServeError) as info:
        client.generate(prompt_ids=[0, 5], max_tokens=200, ignore_eos=True, timeout=0.3)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 5
    wait_idle(server)
    batch = [{"id": f"long{i}", "prompt_ids": [0, i + 5], "max_tokens": 200, "ignore_eos": True} for i in range(4)]
    with pytest.raises(DsaServeError) as info:
        list(client.generate_batch(batch, timeout=0.3))
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(server)


def test_cancelled_stream_frees_the_request(client: Client, server: ServerThread) -> None:
    stream = client.generate_stream(prompt_ids=[0, 9], max_tokens=200, ignore_eos=True)
    next(stream)
    stream.close()
    wait_idle(server)


def test_api_key_round_trip(tiny_dir, monkeypatch) -> None:
    """With $DSASERVE_API_KEYS set, calls without the key get UNAUTHENTICATED; with it, they work."""
    from cluster.local import LocalBackend
    from workers.engine.config import EngineConfig

    monkeypatch.setenv("DSASERVE_API_KEYS", "secret-1, secret-2")
    with LocalBackend.start(tiny_dir, engine_config=EngineConfig(num_blocks=16, max_model_len=256)) as backend:
        srv = ServerThread(backend, Tokenizer.load(tiny_dir))
        try:
            with Client(srv.address, timeout=30) as anonymous:
                with pytest.raises(DsaServeError) as err:
                    anonymous.list_models()
                assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            with Client(srv.address, timeout=30, api_key="secret-2") as client:
                assert client.list_models()[0].vocab_size == 129280
                assert len(client.generate(prompt_ids=[5, 6, 7], max_tokens=2).token_ids) == 2
        finally:
            srv.stop()
