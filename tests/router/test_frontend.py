"""Frontend on a real LocalBackend (tiny checkpoint, real tokenizer, greedy): validation names the
field and the limit before the backend sees the request; stop strings cut the text and abort the
request, freeing its KV blocks; a full admission queue is refused up front."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.local import LocalBackend
from router.backend import AdmissionError, ModelInfo
from router.frontend import Completion, CompletionRequest, Delta, Frontend
from router.tokenizer import Tokenizer
from tests.router.conftest import MAX_MODEL_LEN
from workers.engine.config import EngineConfig
from workers.engine.types import GenerateRequest, RequestError, RequestOutput, SamplingParams

NUM_BLOCKS = 16  # a request needs at most MAX_MODEL_LEN / 64 = 4 blocks
PROMPT = "Q:"
REF_TOKENS = 24  # length of the greedy reference run the stop strings are picked from
LONG = 200  # max_tokens of requests that must be cut short: far more than they get to run


@pytest.fixture(scope="module")
def backend(tiny_dir: Path) -> Iterator[LocalBackend]:
    """Prefill and decode engines over the tiny checkpoint, context capped at MAX_MODEL_LEN."""
    config = EngineConfig(max_model_len=MAX_MODEL_LEN, num_blocks=NUM_BLOCKS)
    with LocalBackend.start(tiny_dir, engine_config=config, disaggregate=True) as be:
        yield be


@pytest.fixture(scope="module")
def queue_of_one(no_tokenizer_dir: Path) -> Iterator[LocalBackend]:
    """The same weights without tokenizer files, admitting one request at a time."""
    config = EngineConfig(max_model_len=MAX_MODEL_LEN, num_blocks=NUM_BLOCKS, max_queue=1)
    with LocalBackend.start(no_tokenizer_dir, engine_config=config, disaggregate=True) as be:
        yield be


def p(**kw) -> SamplingParams:
    return SamplingParams(**kw)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def collect(frontend: Frontend, req: CompletionRequest) -> list[Delta]:
    """All deltas of ``req``; checks that the backend's stream is closed once the last one is out."""

    async def run() -> list[Delta]:
        deltas = [d async for d in frontend.generate(req)]
        assert in_flight(frontend.backend) == 0  # closed now, not when the loop shuts down
        return deltas

    return asyncio.run(run())


def in_flight(backend: LocalBackend) -> int:
    return backend.stats()["router"]["in_flight"]


def requests_total(backend: LocalBackend) -> int:
    return backend.stats()["router"]["requests_total"]


def engines(backend: LocalBackend) -> list:
    return [e for e in (backend.prefill_engine, backend.decode_engine) if e is not None]


def tokens_run(backend: LocalBackend) -> int:
    """Tokens the engines have computed so far (prompt chunks and decode steps)."""
    return sum(e._tokens_done for e in engines(backend))


def wait_idle(backend: LocalBackend, timeout: float = 10.0) -> None:
    """Wait until no sequence runs, waits or is leased anywhere and every KV block is free."""

    def idle() -> bool:
        return in_flight(backend) == 0 and all(
            e.pool.num_free == e.config.num_blocks
            and not e.scheduler.running
            and not e.scheduler.waiting
            and not len(e.leases)
            and not len(e.importer)
            for e in engines(backend)
        )

    deadline = time.monotonic() + timeout
    while not idle() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert idle(), backend.stats()
    assert backend.decode_engine.pool.num_free == NUM_BLOCKS and not backend.decode_engine.scheduler.running


# ---------------------------------------------------------------------------------------- validation

# (id, request for the model's info, field, text the message must hold)
BAD: list[tuple[str, Callable[[ModelInfo], CompletionRequest], str, str]] = [
    ("empty-text", lambda i: CompletionRequest(prompt=""), "prompt", "empty"),
    ("no-prompt", lambda i: CompletionRequest(), "prompt", "empty"),
    ("both-prompts", lambda i: CompletionRequest(prompt="a", prompt_ids=(5,)), "prompt", "not both"),
    ("empty-ids", lambda i: CompletionRequest(prompt_ids=()), "prompt_ids", "empty"),
    ("id-eq-vocab", lambda i: CompletionRequest(prompt_ids=(5, i.vocab_size)), "prompt_ids", "[0, {vocab_size})"),
    ("negative-id", lambda i: CompletionRequest(prompt_ids=(-1,)), "prompt_ids", "outside"),
    ("prompt-fills-context", lambda i: CompletionRequest(prompt_ids=(5,) * i.max_context), "prompt_ids", "{max_context}"),
    ("text-fills-context", lambda i: CompletionRequest(prompt=" hello" * i.max_context), "prompt", "{max_context}"),
    (
        "over-context",
        lambda i: CompletionRequest(prompt_ids=(5,) * (i.max_context - 20), params=p(max_tokens=30)),
        "max_tokens",
        "exceeds the context of {max_context} tokens; ask for at most 20",
    ),
    (
        "max-tokens-limit",
        lambda i: CompletionRequest(prompt_ids=(5,), params=p(max_tokens=i.max_tokens_limit + 1)),
        "max_tokens",
        "≤ {max_tokens_limit}",
    ),
    ("max-tokens-zero", lambda i: CompletionRequest(prompt_ids=(5,), params=p(max_tokens=0)), "max_tokens", "≥ 1"),
    ("temperature", lambda i: CompletionRequest(prompt_ids=(5,), params=p(temperature=-0.5)), "temperature", "[0, 100]"),
    ("top-p-zero", lambda i: CompletionRequest(prompt_ids=(5,), params=p(top_p=0.0)), "top_p", "(0, 1]"),
    ("top-k", lambda i: CompletionRequest(prompt_ids=(5,), params=p(top_k=-1)), "top_k", "0 = off"),
    ("stop-empty", lambda i: CompletionRequest(prompt_ids=(5,), params=p(stop=("",))), "stop", "non-empty"),
    ("logprobs", lambda i: CompletionRequest(prompt_ids=(5,), params=p(logprobs=21)), "logprobs", "20"),
]


def test_limits_come_from_the_engine_config(backend: LocalBackend, tokenizer: Tokenizer) -> None:
    info = Frontend(backend, tokenizer).info
    assert info.max_context == MAX_MODEL_LEN and info.max_tokens_limit == MAX_MODEL_LEN - 1
    assert info.vocab_size == 129280 and info.has_tokenizer


@pytest.mark.parametrize("make,field,limit", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_validation_names_field_and_limit(
    backend: LocalBackend, tokenizer: Tokenizer, make, field: str, limit: str
) -> None:
    frontend = Frontend(backend, tokenizer)
    req = make(frontend.info)
    limit = limit.format(**vars(frontend.info))
    before = requests_total(backend)
    with pytest.raises(RequestError) as info:
        frontend.prepare(req)
    assert info.value.field == field and limit in str(info.value)

    async def run() -> None:  # the streaming entry point refuses it the same way, before the backend
        with pytest.raises(RequestError) as again:
            await anext(frontend.generate(req))
        assert again.value.field == field and limit in str(again.value)

    asyncio.run(run())
    assert requests_total(backend) == before and in_flight(backend) == 0


def test_text_prompt_needs_a_tokenizer(queue_of_one: LocalBackend, no_tokenizer_dir: Path) -> None:
    frontend = Frontend(queue_of_one, Tokenizer.load(no_tokenizer_dir))
    assert frontend.tokenizer is None and not frontend.info.has_tokenizer
    with pytest.raises(RequestError) as info:
        frontend.prepare(CompletionRequest(prompt="Hello"))
    assert info.value.field == "prompt" and "prompt_ids" in str(info.value)
    assert repr(no_tokenizer_dir.name) in str(info.value)  # names the model
    with pytest.raises(RequestError) as info:
        frontend.tokenize("Hello")
    assert info.value.field == "text"
    assert frontend.prepare(CompletionRequest(prompt_ids=(5, 6))).prompt_token_ids == (5, 6)
    # token ids in, token ids out: the request runs, with no text
    out = Completion.from_deltas(collect(frontend, CompletionRequest(prompt_ids=(0, 5, 6), params=greedy(3))))
    assert len(out.token_ids) == 3 and out.text == "" and out.finish_reason == "length"
    wait_idle(queue_of_one)


def test_request_ids_are_assigned_and_unique_in_flight(backend: LocalBackend, tokenizer: Tokenizer) -> None:
    frontend = Frontend(backend, tokenizer)
    a, b = (frontend.prepare(CompletionRequest(prompt="Hi")).request_id for _ in range(2))
    assert a and b and a != b

    async def run() -> None:
        stream = frontend.generate(CompletionRequest(prompt="Hi", params=greedy(LONG), request_id="r1"))
        for _ in range(2):  # past prefill (see test_closing_right_after_the_first_token_frees_the_prefill_lease)
            delta = await anext(stream)
            assert delta.request_id == "r1" and not delta.finished
        with pytest.raises(RequestError, match="in flight") as info:
            frontend.prepare(CompletionRequest(prompt="Hi", request_id="r1"))
        assert info.value.field == "request_id"
        await stream.aclose()
        assert in_flight(backend) == 0
        frontend.prepare(CompletionRequest(prompt="Hi", request_id="r1"))  # free again

    asyncio.run(run())
    wait_idle(backend)


# ------------------------------------------------------------------------------- streaming and usage


@dataclass(frozen=True)
class Reference:
    """A greedy run of PROMPT without stop strings: its tokens, and each token's text."""

    token_ids: tuple[int, ...]
    pieces: tuple[str, ...]

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def end(self, i: int) -> int:
        """Length of the text once token ``i`` is in."""
        return sum(len(s) for s in self.pieces[: i + 1])

    def tokens_until(self, pos: int) -> int:
        """How many tokens it takes for the text to reach ``pos`` characters."""
        return next(i + 1 for i in range(len(self.pieces)) if self.end(i) >= pos)


@pytest.fixture(scope="module")
def reference(backend: LocalBackend, tokenizer: Tokenizer) -> Reference:
    deltas = collect(Frontend(backend, tokenizer), CompletionRequest(prompt=PROMPT, params=greedy(REF_TOKENS)))
    assert all(len(d.token_ids) == 1 for d in deltas)  # one token per increment: pieces are per token
    ref = Reference(tuple(t for d in deltas for t in d.token_ids), tuple(d.text for d in deltas))
    assert len(ref.token_ids) == REF_TOKENS and ref.text == tokenizer.decode(ref.token_ids)
    return ref


def test_stream_text_equals_complete_and_usage_passes_through(
    backend: LocalBackend, tokenizer: Tokenizer, reference: Reference
) -> None:
    frontend = Frontend(backend, tokenizer)
    start = time.monotonic()
    deltas = collect(frontend, CompletionRequest(prompt=PROMPT, params=greedy(16)))
    elapsed = time.monotonic() - start
    streamed = Completion.from_deltas(deltas)
    whole = asyncio.run(frontend.complete(CompletionRequest(prompt=PROMPT, params=greedy(16))))
    assert streamed.token_ids == whole.token_ids == reference.token_ids[:16]  # greedy: the same every time
    assert streamed.text == whole.text == tokenizer.decode(whole.token_ids) == reference.text[: reference.end(15)]
    assert streamed.finish_reason == whole.finish_reason == "length"

    # the frontend hands on exactly what the backend produces for the prepared request
    async def direct() -> list[RequestOutput]:
        greq = frontend.prepare(CompletionRequest(prompt=PROMPT, params=greedy(16)))
        async with aclosing(backend.generate(greq)) as outs:
            return [o async for o in outs]

    outs = asyncio.run(direct())
    assert [d.token_ids for d in deltas] == [o.new_token_ids for o in outs]
    assert [d.usage for d in deltas] == [o.usage for o in outs]

    prompt_tokens = len(tokenizer.encode(PROMPT))
    assert [d.usage.completion_tokens for d in deltas] == list(range(1, 17))
    assert all(d.usage.prompt_tokens == prompt_tokens for d in deltas)
    assert streamed.usage.completion_tokens == len(streamed.token_ids) == 16
    assert [d.finished for d in deltas] == [False] * 15 + [True] and deltas[-1].finish_reason == "length"
    ttft = streamed.ttft_s
    assert ttft is not None and 0 < ttft < elapsed and all(d.ttft_s == ttft for d in deltas)
    wait_idle(backend)


# ------------------------------------------------------------------------------------- stop strings


def across_boundary(ref: Reference) -> tuple[str, ...]:
    """Two characters either side of a token boundary."""
    text = ref.text
    for i in range(1, len(ref.pieces) - 1):
        b = ref.end(i)
        s = text[b - 2 : b + 2]
        if len(ref.pieces[i]) >= 2 and len(ref.pieces[i + 1]) >= 2 and text.find(s) == b - 2:
            return (s,)
    raise AssertionError(f"no stop string across a token boundary in {ref.pieces}")


def mid_token(ref: Reference) -> tuple[str, ...]:
    """Starts inside a token, ends inside the next one."""
    text = ref.text
    for i in range(1, len(ref.pieces) - 1):
        start = ref.end(i) - len(ref.pieces[i]) + 1
        s = ref.pieces[i][1:] + ref.pieces[i + 1][:1]
        if len(ref.pieces[i]) >= 3 and ref.pieces[i + 1] and text.find(s) == start:
            return (s,)
    raise AssertionError(f"no stop string starting mid-token in {ref.pieces}")


def multi_token(ref: Reference) -> tuple[str, ...]:
    """Covers a whole token and reaches into both neighbours."""
    text = ref.text
    for i in range(1, len(ref.pieces) - 2):
        s = ref.pieces[i][-1:] + ref.pieces[i + 1] + ref.pieces[i + 2][:1]
        if ref.pieces[i] and ref.pieces[i + 1] and ref.pieces[i + 2] and text.find(s) == ref.end(i) - 1:
            return (s,)
    raise AssertionError(f"no stop string spanning a whole token in {ref.pieces}")


def earliest(ref: Reference) -> tuple[str, ...]:
    """An absent stop, a later one and an earlier one (listed in that order): the earlier wins."""
    (early,) = across_boundary(ref)
    end = ref.text.find(early) + len(early)
    for i in range(ref.tokens_until(end) + 1, len(ref.pieces)):
        s = ref.pieces[i][:3]
        if s and ref.text.find(s) >= end:
            return ("never in this text", s, early)
    raise AssertionError(f"no second stop string after {early!r} in {ref.pieces}")


def single_char(ref: Reference) -> tuple[str, ...]:
    """One character (nothing is held back), first seen a few tokens in."""
    for i in range(2, len(ref.pieces)):
        c = ref.pieces[i][:1]
        if c and ref.text.find(c) == ref.end(i) - len(ref.pieces[i]):
            return (c,)
    raise AssertionError(f"no character first seen after token 2 in {ref.pieces}")


@pytest.mark.parametrize(
    "pick", [across_boundary, mid_token, multi_token, earliest, single_char], ids=lambda f: f.__name__
)
def test_stop_string_cuts_text_and_aborts(
    backend: LocalBackend, tokenizer: Tokenizer, reference: Reference, pick
) -> None:
    stops = pick(reference)
    full = reference.text
    cut = min(full.find(s) for s in stops if s in full)
    (hit,) = [s for s in stops if full.find(s) == cut]
    needed = reference.tokens_until(cut + len(hit))  # tokens until the match is complete
    assert 1 < needed < REF_TOKENS

    wait_idle(backend)
    ran_before = tokens_run(backend)
    frontend = Frontend(backend, tokenizer)
    req = CompletionRequest(prompt=PROMPT, params=greedy(LONG, stop=stops), request_id="s")
    deltas = collect(frontend, req)  # also checks the backend's stream was closed at the stop

    # deltas only append, so no delta ever showed text past the cut, even before the match completed
    assert "".join(d.text for d in deltas) == full[:cut]
    assert all(not d.finished for d in deltas[:-1])
    assert deltas[-1].finished and deltas[-1].finish_reason == "stop"
    token_ids = tuple(t for d in deltas for t in d.token_ids)
    assert token_ids == reference.token_ids[:needed]  # stopped at the token that completed the match
    assert deltas[-1].usage.completion_tokens == needed

    # the request was aborted: its blocks are free long before LONG tokens could have run
    wait_idle(backend)
    prompt_tokens = len(tokenizer.encode(PROMPT))
    assert tokens_run(backend) - ran_before < prompt_tokens + LONG // 2


def test_closing_the_stream_early_frees_the_request(backend: LocalBackend, tokenizer: Tokenizer) -> None:
    wait_idle(backend)
    ran_before = tokens_run(backend)
    frontend = Frontend(backend, tokenizer)

    async def run() -> None:
        stream = frontend.generate(CompletionRequest(prompt=PROMPT, params=greedy(LONG), request_id="c"))
        for _ in range(3):  # past prefill: the decode engine holds the request's blocks now
            assert not (await anext(stream)).finished
        assert in_flight(backend) == 1 and backend.decode_engine.pool.num_free < NUM_BLOCKS
        await stream.aclose()
        assert in_flight(backend) == 0  # the backend's stream was closed with ours
        frontend.prepare(CompletionRequest(prompt=PROMPT, request_id="c"))  # the id is free again

    asyncio.run(run())
    wait_idle(backend)
    assert tokens_run(backend) - ran_before < LONG // 2


def test_closing_right_after_the_first_token_frees_the_prefill_lease(tiny_dir: Path, tokenizer: Tokenizer) -> None:
    # its own backend: a leaked lease would hold blocks for lease_s (30 s) and stall the other tests
    config = EngineConfig(max_model_len=MAX_MODEL_LEN, num_blocks=NUM_BLOCKS)
    with LocalBackend.start(tiny_dir, engine_config=config, disaggregate=True) as be:
        frontend = Frontend(be, tokenizer)

        async def run() -> None:
            stream = frontend.generate(CompletionRequest(prompt=PROMPT, params=greedy(LONG)))
            assert not (await anext(stream)).finished  # the first token: prefill done, decode not begun
            await stream.aclose()
            assert in_flight(be) == 0

        asyncio.run(run())
        wait_idle(be, timeout=2.0)  # far less than lease_s: freed by the close, not by expiry


class WorkerGoneAway:
    """The real backend, except that its stream ends right before the finished output, as a router
    sees it when a remote worker dies mid-request (a failure an in-process backend cannot have)."""

    def __init__(self, backend: LocalBackend) -> None:
        self.backend = backend

    def info(self) -> ModelInfo:
        return self.backend.info()

    def stats(self) -> dict:
        return self.backend.stats()

    async def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        async with aclosing(self.backend.generate(req)) as outs:
            async for out in outs:
                if out.finished:
                    return
                yield out


def test_a_backend_that_ends_early_still_finishes_the_request(
    backend: LocalBackend, tokenizer: Tokenizer, reference: Reference
) -> None:
    deltas = collect(
        Frontend(WorkerGoneAway(backend), tokenizer), CompletionRequest(prompt=PROMPT, params=greedy(3))
    )
    assert [d.finished for d in deltas] == [False, False, True] and deltas[-1].finish_reason == "abort"
    out = Completion.from_deltas(deltas)
    assert out.token_ids == reference.token_ids[:2] and out.text == reference.text[: reference.end(1)]
    assert out.usage.completion_tokens == 2
    wait_idle(backend)


# ----------------------------------------------------------------------------------------- admission


def test_a_full_queue_refuses_before_the_first_delta(queue_of_one: LocalBackend) -> None:
    frontend = Frontend(queue_of_one, None)
    wait_idle(queue_of_one)

    async def two_at_once() -> list:
        reqs = [CompletionRequest(prompt_ids=(0, 5 + i), params=greedy(4), request_id=f"g{i}") for i in range(2)]
        return await asyncio.gather(*(frontend.complete(r) for r in reqs), return_exceptions=True)

    done, refused = asyncio.run(two_at_once())
    assert isinstance(done, Completion) and len(done.token_ids) == 4 and done.finish_reason == "length"
    assert isinstance(refused, AdmissionError) and refused.retry_after_s > 0 and "queue full" in str(refused)
    wait_idle(queue_of_one)

    async def while_one_runs() -> None:
        before = requests_total(queue_of_one)
        running = frontend.generate(CompletionRequest(prompt_ids=(0, 5), params=greedy(LONG), request_id="a"))
        for _ in range(2):  # admitted, and past prefill: the queue of one is full now
            assert not (await anext(running)).finished
        with pytest.raises(AdmissionError):
            await anext(frontend.generate(CompletionRequest(prompt_ids=(0, 7), params=greedy(2), request_id="b")))
        assert requests_total(queue_of_one) == before + 1  # the refused request never ran
        await running.aclose()  # aborts the running request: the queue has room again
        out = await frontend.complete(CompletionRequest(prompt_ids=(0, 7), params=greedy(2), request_id="b"))
        assert len(out.token_ids) == 2 and out.finish_reason == "length" and out.request_id == "b"

    asyncio.run(while_one_runs())
    wait_idle(queue_of_one)


# ------------------------------------------------------------------------------------------ JSON shapes


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
