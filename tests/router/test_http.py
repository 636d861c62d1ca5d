"""The OpenAI-compatible HTTP API through the real OpenAI SDK, against uvicorn on real LocalBackends
(the session's gRPC servers' backends, so HTTP and gRPC answers can be compared) and on fakes for the
failures a real engine cannot be made to show on demand."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import openai
import pytest

from router.backend import AdmissionError, BackendUnavailable, ModelInfo
from router.chat import END_THINK, ChatMessage, render_chat
from router.client import Client
from router.frontend import Frontend
from router.http import build_app, start_http_server
from router.http.responses import ReasoningSplit
from tests.router.conftest import MAX_MODEL_LEN, ServerThread
from tests.router.test_server import wait_idle
from workers.engine.types import GenerateRequest, RequestOutput, Usage

KEY = "sk-test-key"
USAGE_KEYS = {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details",
              "prompt_cache_hit_tokens", "prompt_cache_miss_tokens"}


class HTTPThread:
    """The HTTP API over ``backend`` on an event loop in a daemon thread (the SDK's calls are sync)."""

    def __init__(self, backend, tokenizer, *, api_keys: frozenset[str] = frozenset(), loop=None) -> None:
        self.own_loop = loop is None
        self.loop = loop or asyncio.new_event_loop()
        if self.own_loop:
            threading.Thread(target=self.loop.run_forever, daemon=True).start()
        app = build_app(Frontend(backend, tokenizer), api_keys=api_keys)
        self.server = self.run(start_http_server(app, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.port}"

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.run(self.server.stop(0))
        if self.own_loop:
            self.loop.call_soon_threadsafe(self.loop.stop)


def raw(url: str, body: dict | bytes | None = None, headers: dict | None = None) -> tuple[int, Any, dict]:
    """(status, headers (case-insensitive), JSON body) of a plain HTTP call."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


@pytest.fixture(scope="module")
def http(server: ServerThread, tokenizer) -> Iterator[HTTPThread]:
    """HTTP beside the session's gRPC server: same backend, same loop."""
    h = HTTPThread(server.backend, tokenizer, loop=server.loop)
    yield h
    h.stop()


@pytest.fixture(scope="module")
def api(http: HTTPThread) -> openai.OpenAI:
    return http.client()


@pytest.fixture(scope="module")
def model(server: ServerThread) -> str:
    return server.backend.info().model_id


def test_models(api: openai.OpenAI, model: str) -> None:
    data = api.models.list().data
    assert [m.id for m in data] == [model]
    assert data[0].owned_by == "dsaserve" and data[0].model_dump()["max_model_len"] == MAX_MODEL_LEN
    assert api.models.retrieve(model).id == model


def test_completion_usage_and_finish(api: openai.OpenAI, model: str, tokenizer) -> None:
    r = api.completions.create(model=model, prompt="Hello, world", max_tokens=5, temperature=0,
                               extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length" and r.choices[0].text
    usage = r.usage.model_dump()
    assert USAGE_KEYS <= set(usage)
    assert usage["prompt_tokens"] == len(tokenizer.encode("Hello, world")) and usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5
    assert usage["prompt_cache_hit_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert usage["prompt_cache_hit_tokens"] + usage["prompt_cache_miss_tokens"] == usage["prompt_tokens"]


def test_stream_equals_whole_and_reports_usage(api: openai.OpenAI, model: str) -> None:
    args = dict(model=model, prompt=[0, 11, 42, 7], max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    whole = api.completions.create(**args)
    chunks = list(api.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_greedy_http_equals_grpc(api: openai.OpenAI, model: str, server: ServerThread) -> None:
    ids = [0, 5, 17, 99, 3]
    r = api.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    with Client(server.address, timeout=60) as c:
        g = c.generate(prompt_ids=ids, max_tokens=8, ignore_eos=True)
    assert r.choices[0].text == g.text and r.usage.completion_tokens == len(g.token_ids) == 8
    assert r.choices[0].finish_reason == g.finish_reason == "length"


def test_stop_string_and_logprobs(api: openai.OpenAI, model: str) -> None:
    base = api.completions.create(model=model, prompt="Once upon", max_tokens=8, temperature=0,
                                  logprobs=2, extra_body={"ignore_eos": True})
    lp = base.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    text = base.choices[0].text
    stop = text[len(text) // 2:][:2]
    if stop:
        cut = api.completions.create(model=model, prompt="Once upon", max_tokens=8, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True})
        assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("thinking", [False, True], ids=["plain", "thinking"])
def test_chat_renders_deepseek_template(api: openai.OpenAI, model: str, thinking: bool) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    kwargs = dict(model=model, messages=messages, max_completion_tokens=5, temperature=0)
    chat = api.chat.completions.create(**kwargs, extra_body={"chat_template_kwargs": {"thinking": thinking},
                                                             "ignore_eos": True})
    prompt = render_chat([ChatMessage(**m) for m in messages], thinking=thinking)
    plain = api.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert reply(chat.choices[0].message, thinking) == plain.choices[0].text
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens
    top = api.chat.completions.create(**kwargs, extra_body={"thinking": thinking, "ignore_eos": True})
    assert top.choices[0].message == chat.choices[0].message

    stream = list(api.chat.completions.create(**kwargs, stream=True, logprobs=True, top_logprobs=2,
                                              extra_body={"thinking": thinking, "ignore_eos": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    joined = {k: "".join(getattr(c.choices[0].delta, k, None) or "" for c in stream)
              for k in ("content", "reasoning_content")}
    assert joined["content"] == chat.choices[0].message.content
    assert joined["reasoning_content"] == (getattr(chat.choices[0].message, "reasoning_content", None) or "")
    assert sum(len(c.choices[0].logprobs.content) for c in stream if c.choices[0].logprobs) == 5
    assert stream[-1].choices[0].finish_reason == "length"


def reply(message, thinking: bool) -> str:
    """The raw reply text: in thinking mode the reasoning, ``</think>``, then the content."""
    if not thinking:
        return message.content
    reasoning = message.reasoning_content
    return reasoning + END_THINK + message.content if message.content else reasoning


@pytest.mark.parametrize(("pieces", "reasoning", "content"), [
    (["abc</th", "ink>hel", "lo"], "abc", "hello"),
    (["a</", "b", "</think", ">"], "a</b", ""),
    (["just thinking <", "/t"], "just thinking </t", ""),
], ids=["split-marker", "false-start", "no-marker"])
def test_reasoning_split_streams(pieces: list[str], reasoning: str, content: str) -> None:
    split, got = ReasoningSplit(), ["", ""]
    for i, piece in enumerate(pieces):
        r, c = split.push(piece, final=i == len(pieces) - 1)
        got = [got[0] + r, got[1] + c]
    assert got == [reasoning, content]
    assert ReasoningSplit().push("".join(pieces), final=True) == (reasoning, content)


def test_chat_without_max_tokens_fills_the_context(api: openai.OpenAI, model: str) -> None:
    r = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "go"}], temperature=0,
                                    extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == MAX_MODEL_LEN


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "max_tokenz": 3}, "max_tokenz"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": "x", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "stop": ["s"] * 100}, "stop"),
    ({"prompt": "x", "top_p": "high"}, "top_p"),
    ({}, "prompt"),
], ids=["range", "unknown", "n", "prompts", "vocab", "context", "penalty", "stop-limit", "type", "missing"])
def test_bad_completion_is_400_naming_param(http: HTTPThread, body: dict, param: str) -> None:
    status, _, out = raw(http.url + "/v1/completions", body)
    assert status == 400 and out["error"]["param"] == param, out
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
], ids=["role", "max_completion_tokens", "top_logprobs", "tools"])
def test_bad_chat_is_400_naming_param(http: HTTPThread, body: dict, param: str) -> None:
    status, _, out = raw(http.url + "/v1/chat/completions", body)
    assert status == 400 and out["error"]["param"] == param, out


def test_sdk_raises_bad_request_with_param(api: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model=model, prompt="x", top_p=0)
    assert e.value.param == "top_p"


def test_unknown_model_is_404(api: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        api.completions.create(model="gpt-4o", prompt="x", max_tokens=1)
    assert e.value.param == "model" and e.value.code == "model_not_found"


def test_oversize_body_is_413_before_it_is_read(http: HTTPThread, server: ServerThread) -> None:
    limit = server.backend.info().limits.max_message_bytes
    conn = HTTPConnection("127.0.0.1", http.server.port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(limit + 1))
    conn.endheaders()  # the body is never sent: the answer must not wait for it
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    conn.close()


def test_api_keys(server: ServerThread, tokenizer, model: str) -> None:
    h = HTTPThread(server.backend, tokenizer, api_keys=frozenset({KEY, "other"}), loop=server.loop)
    try:
        with pytest.raises(openai.AuthenticationError):
            h.client("wrong").models.list()
        assert raw(h.url + "/v1/models")[0] == 401  # no key at all
        status, _, out = raw(h.url + "/v1/completions", {"prompt": "x", "bogus": 1})
        assert status == 401 and out["error"]["code"] == "invalid_api_key"  # before the body is judged
        assert h.client(KEY).completions.create(model=model, prompt="x", max_tokens=1).usage.completion_tokens == 1
        assert raw(h.url + "/health")[0] == 200  # probes need no key
    finally:
        h.stop()


def test_full_queue_is_429_with_retry_after(small_queue_server: ServerThread) -> None:
    h = HTTPThread(small_queue_server.backend, None, loop=small_queue_server.loop)
    try:
        api, model = h.client(), small_queue_server.backend.info().model_id
        long = api.completions.create(model=model, prompt=[0, 1, 2], max_tokens=200, stream=True,
                                      extra_body={"ignore_eos": True})
        first = next(iter(long))  # admitted and running: the queue of one is full
        assert first.choices
        status, headers, out = raw(h.url + "/v1/completions", {"prompt": [0, 1], "max_tokens": 1})
        assert status == 429 and int(headers["Retry-After"]) >= 1 and out["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            api.completions.create(model=model, prompt=[0, 1], max_tokens=1)
        long.close()  # the client goes away: the request is aborted and its blocks freed
        wait_idle(small_queue_server)
        assert api.completions.create(model=model, prompt=[0, 1], max_tokens=2).usage.completion_tokens >= 1
    finally:
        h.stop()


class FakeBackend:
    """A backend whose requests fail as told: ``mode`` "unavailable", "admission" or "engine-error"."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def info(self) -> ModelInfo:
        return ModelInfo(model_id="fake", vocab_size=1000, max_context=64, max_tokens_limit=63, max_queue=4,
                         block_size=16, eos_token_id=1, bos_token_id=0, index_topk=8, has_tokenizer=False)

    async def health(self) -> str | None:
        return "no decode worker is ready" if self.mode == "unavailable" else None

    async def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        if self.mode == "unavailable":
            raise BackendUnavailable("no decode worker is ready")
        if self.mode == "admission":
            raise AdmissionError("queue full", retry_after_s=2.5)
        yield RequestOutput(req.request_id, (5,), False, Usage(len(req.prompt_token_ids), 0, 1))
        yield RequestOutput(req.request_id, (), True, Usage(len(req.prompt_token_ids), 0, 1), "error",
                            error="worker lost the KV cache")

    def stats(self) -> dict:
        return {"mode": "fake", "router": {}, "workers": []}


@pytest.fixture
def fake():
    made = []

    def make(mode: str) -> HTTPThread:
        made.append(HTTPThread(FakeBackend(mode), None))
        return made[-1]

    yield make
    for h in made:
        h.stop()


def test_unavailable_is_503_and_health_says_so(fake) -> None:
    h = fake("unavailable")
    with pytest.raises(openai.InternalServerError) as e:
        h.client().completions.create(model="fake", prompt=[3], max_tokens=1)
    assert e.value.status_code == 503
    status, _, out = raw(h.url + "/health")
    assert status == 503 and "decode worker" in out["error"]["message"]


def test_admission_retry_after_rounds_up(fake) -> None:
    status, headers, _ = raw(fake("admission").url + "/v1/completions", {"prompt": [3], "max_tokens": 1})
    assert status == 429 and headers["Retry-After"] == "3" and headers["retry-after-ms"] == "2500"


def test_engine_error_is_500_or_error_event(fake) -> None:
    h = fake("engine-error")
    status, _, out = raw(h.url + "/v1/completions", {"prompt": [3], "max_tokens": 4})
    assert status == 500 and out["error"]["type"] == "server_error" and "KV cache" in out["error"]["message"]
    with pytest.raises(openai.APIError, match="KV cache"):
        list(h.client().completions.create(model="fake", prompt=[3], max_tokens=4, stream=True))


def test_local_serves_grpc_and_http(tiny_dir) -> None:
    """``dsaserve local --port 0`` also serves HTTP on a free port, named in the ready line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli_serve", "local", "--model", str(tiny_dir), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline()
        assert "ready on 127.0.0.1:" in line and ", http on 127.0.0.1:" in line, line + proc.stderr.read()
        grpc_address = line.split("ready on ")[1].split()[0]
        http_url = "http://" + line.split("http on ")[1].split()[0]
        with Client(grpc_address, timeout=30) as c:
            assert c.health() == "SERVING"
        assert raw(http_url + "/health")[0] == 200
        api = openai.OpenAI(base_url=http_url + "/v1", api_key="none", max_retries=0, timeout=60)
        r = api.completions.create(model=tiny_dir.name, prompt=[0, 5], max_tokens=2, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_no_http_excludes_http_port(capsys: pytest.CaptureFixture[str], tiny_dir) -> None:
    from cluster.cli_serve import main

    assert main(["local", "--model", str(tiny_dir), "--no-http", "--http-port", "9000"]) == 2  # before loading
    assert "--no-http" in capsys.readouterr().err
