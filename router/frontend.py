"""The router's request front: validation, tokenization, detokenization and stop strings.

One ``Frontend`` serves the gRPC server, the offline CLI and batch jobs, so a request gives the same
tokens and text whichever way it arrives. It turns a ``CompletionRequest`` (text or token ids, as a
client states it) into the engine's ``GenerateRequest``, runs it on a ``Backend`` and turns the
engine's token increments into ``Delta``s with text. Stop strings live here because the engine knows
only token ids: a match cuts the text, finishes the request with reason ``"stop"`` and closes the
backend's iterator, which aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from router.backend import Backend, ModelInfo
from router.metrics import metrics_for
from router.chat import ChatMessage, parse_messages, render_chat
from router.tokenizer import Tokenizer
from workers.engine.types import GenerateRequest, RequestError, SamplingParams, TokenLogprob, Usage


@dataclass(frozen=True)
class CompletionRequest:
    """A request as a client states it: exactly one of ``prompt`` (text), ``prompt_ids`` or ``messages``
    (a chat, rendered by ``router.chat.render_chat``; ``thinking`` applies to it alone)."""

    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None  # None: a UUID is assigned
    cache_salt: str | None = None
    priority: int = 0
    tenant: str | None = None  # set by the server from the caller's credentials, never by a client
    messages: tuple[ChatMessage, ...] | None = None
    thinking: bool = False  # a chat's reply opens with <think> rather than </think>

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CompletionRequest:
        """A request from a JSON object (a batch line, a client's dict): ``prompt``, ``prompt_ids`` or
        ``messages`` (OpenAI-style, see ``router.chat.parse_messages``) with ``thinking``,
        the ``SamplingParams`` fields, ``id``/``request_id``, ``cache_salt``, ``priority``.

        Checks types only (values are the Frontend's to judge). Raises RequestError naming the key.
        """
        unknown = sorted(set(d) - _JSON_FIELDS)
        if unknown:
            raise RequestError(unknown[0], f"unknown field (known: {', '.join(sorted(_JSON_FIELDS))})")
        for key, kind in _JSON_TYPES.items():
            if d.get(key) is not None and not _is(d[key], kind):
                raise RequestError(key, f"must be {kind}, got {type(d[key]).__name__}")
        stop = d.get("stop")
        sampling = {k: d[k] for k in _SAMPLING_KEYS if d.get(k) is not None}
        sampling["stop"] = (stop,) if isinstance(stop, str) else tuple(stop or ())
        sampling["stop_token_ids"] = tuple(d.get("stop_token_ids") or ())
        rid = d.get("request_id", d.get("id"))
        return cls(
            prompt=d.get("prompt"),
            prompt_ids=tuple(d["prompt_ids"]) if d.get("prompt_ids") is not None else None,
            params=SamplingParams(**sampling),
            request_id=None if rid is None else str(rid),
            cache_salt=d.get("cache_salt"),
            priority=d.get("priority") or 0,
            messages=parse_messages(d["messages"]) if d.get("messages") is not None else None,
            thinking=bool(d.get("thinking")),
        )


@dataclass(frozen=True)
class Delta:
    """An increment of one request: new tokens and the text they complete.

    ``usage`` holds totals so far. The last delta has ``finished`` and ``finish_reason``; ``error``
    explains an ``"error"`` finish. Text is empty when the server has no tokenizer.
    """

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finished: bool
    usage: Usage
    finish_reason: str | None = None
    ttft_s: float | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class Completion:
    """A whole completion: what ``Frontend.complete`` and the clients' ``generate`` return."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str
    usage: Usage
    ttft_s: float | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    error: str | None = None

    @classmethod
    def from_deltas(cls, deltas: list[Delta]) -> Completion:
        """Join one request's deltas (the last must be finished)."""
        last = deltas[-1]
        return cls(
            request_id=last.request_id,
            token_ids=tuple(t for d in deltas for t in d.token_ids),
            text="".join(d.text for d in deltas),
            finish_reason=last.finish_reason or "abort",
            usage=last.usage,
            ttft_s=next((d.ttft_s for d in deltas if d.ttft_s is not None), None),
            logprobs=tuple(lp for d in deltas for lp in d.logprobs),
            error=last.error,
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON shape the CLI prints (``generate --json``, ``client generate --json``, batch lines)."""
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "token_ids": list(self.token_ids),
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.usage.prompt_tokens,
                "cached_tokens": self.usage.cached_tokens,
                "completion_tokens": self.usage.completion_tokens,
            },
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1000.0, 3),
        }
        if self.logprobs:
            out["logprobs"] = [
                {"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
                for lp in self.logprobs
            ]
        if self.error:
            out["error"] = self.error
        return out


class Frontend:
    """Validates, tokenizes and runs requests on a backend; detokenizes and applies stop strings.

    Engines key requests by a server-made id (``GenerateRequest.request_id``, a fresh UUID per
    request), never by the client's: two routers, or two clients, using the same id cannot cross
    outputs or leases. The client's id is only echoed in its deltas.

    Args:
        backend: runs token-id requests (``router.backend.Backend``).
        tokenizer: the model's tokenizer, or None to accept token-id prompts only (text stays empty).
    """

    def __init__(self, backend: Backend, tokenizer: Tokenizer | None) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.info: ModelInfo = backend.info()
        self._in_flight: set[str] = set()
        self.metrics = metrics_for(backend)  # the backend's registry: requests of every Frontend on it

    def tokenize(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; RequestError("text") when the model has no tokenizer or the text is
        longer than ``max_prompt_chars``."""
        tokenizer = self._require_tokenizer("text")
        _check_len("text", len(text), self.info.limits.max_prompt_chars, "characters")
        return tokenizer.encode(text, add_bos=add_bos)

    async def tokenize_async(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """``tokenize`` off the event loop (a long text takes milliseconds to encode)."""
        self._require_tokenizer("text")
        _check_len("text", len(text), self.info.limits.max_prompt_chars, "characters")
        return await asyncio.to_thread(self.tokenize, text, add_bos=add_bos)

    def prepare(self, req: CompletionRequest) -> GenerateRequest:
        """Validate ``req`` against the model's limits and tokenize it (on this thread).

        Raises:
            RequestError: naming the first bad field and the limit it broke.
        """
        self.check_limits(req)
        return self._finish_prepare(req, self._prompt_ids(req))

    async def prepare_async(self, req: CompletionRequest) -> GenerateRequest:
        """``prepare`` with a text prompt tokenized off the event loop, after every cheap check."""
        self.check_limits(req)
        has_text = req.prompt is not None or req.messages is not None
        if has_text and req.prompt_ids is None and self.tokenizer is not None:
            return self._finish_prepare(req, await asyncio.to_thread(self._prompt_ids, req))
        return self._finish_prepare(req, self._prompt_ids(req))

    def check_limits(self, req: CompletionRequest) -> None:
        """The cheap checks: sizes of client-controlled fields, then the sampling values.

        Raises:
            RequestError: naming the field and the limit.
        """
        lim, params = self.info.limits, req.params
        if req.request_id is not None:
            _check_len("request_id", len(req.request_id), lim.max_request_id_chars, "characters")
        if req.cache_salt is not None:
            _check_len("cache_salt", len(req.cache_salt), lim.max_cache_salt_chars, "characters")
        _check_len("stop", len(params.stop), lim.max_stop_strings, "stop strings")
        for s in params.stop:
            _check_len("stop", len(s), lim.max_stop_string_chars, "characters per stop string")
        _check_len("stop_token_ids", len(params.stop_token_ids), lim.max_stop_token_ids, "ids")
        if req.prompt is not None:
            _check_len("prompt", len(req.prompt), lim.max_prompt_chars, "characters")
        params.validate(self.info.vocab_size)
        if params.max_tokens > self.info.max_tokens_limit:
            raise RequestError("max_tokens", f"must be ≤ {self.info.max_tokens_limit}, got {params.max_tokens}")

    def _finish_prepare(self, req: CompletionRequest, prompt: tuple[tuple[int, ...], str]) -> GenerateRequest:
        info, params = self.info, req.params
        ids, name = prompt
        if len(ids) >= info.max_context:
            raise RequestError(name, f"prompt has {len(ids)} tokens; the context holds {info.max_context}")
        if len(ids) + params.max_tokens > info.max_context:
            raise RequestError(
                "max_tokens",
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of "
                f"{info.max_context} tokens; ask for at most {info.max_context - len(ids)}",
            )
        if req.request_id is not None and req.request_id in self._in_flight:
            raise RequestError("request_id", f"{req.request_id!r} is already in flight")
        return GenerateRequest(
            request_id=uuid.uuid4().hex,  # the engines' key: server-made, see the class docstring
            prompt_token_ids=ids,
            params=params,
            cache_salt=tenant_salt(req.tenant, req.cache_salt),
            priority=req.priority,
        )

    async def generate(self, req: CompletionRequest) -> AsyncIterator[Delta]:
        """Run ``req``, yielding deltas; the last is finished.

        Raises (before the first delta) RequestError, and whatever the backend raises on admission
        (``AdmissionError``, ``BackendUnavailable``). Closing this iterator early aborts the request.
        """
        arrived = time.monotonic()
        greq = await self.prepare_async(req)
        client_id = req.request_id or greq.request_id
        self._in_flight.add(client_id)
        observed = self.metrics.request(arrived)
        try:
            async with aclosing(self._run(greq, client_id)) as deltas:
                async for delta in deltas:
                    observed.delta(delta)
                    yield delta
        finally:
            observed.close()
            self._in_flight.discard(client_id)

    async def complete(self, req: CompletionRequest) -> Completion:
        """Run ``req`` to the end and return the whole completion."""
        deltas = []
        async with aclosing(self.generate(req)) as stream:
            async for delta in stream:
                deltas.append(delta)
        return Completion.from_deltas(deltas)

    async def _run(self, greq: GenerateRequest, client_id: str) -> AsyncIterator[Delta]:
        stops = greq.params.stop
        # Text that could still be the start of a stop string is held back until it can't.
        hold = max((len(s) for s in stops), default=1) - 1
        detok = self.tokenizer.detokenizer(greq.prompt_token_ids) if self.tokenizer else None
        text, sent, num_tokens, ttft = "", 0, 0, None
        usage = Usage(len(greq.prompt_token_ids), 0, 0)
        stream = self.backend.generate(greq)
        try:
            async for out in stream:
                num_tokens += len(out.new_token_ids)
                ttft = out.ttft_s if out.ttft_s is not None else ttft
                usage = out.usage
                searched = len(text)
                if detok is not None:
                    text += detok.push(out.new_token_ids)
                    if out.finished:
                        text += detok.flush()
                cut = _find_stop(text, stops, max(0, searched - hold))
                if cut is not None:
                    text = text[:cut]
                    usage = Usage(out.usage.prompt_tokens, out.usage.cached_tokens, num_tokens)
                    yield Delta(client_id, out.new_token_ids, text[sent:], True, usage, "stop", ttft, out.logprobs)
                    return
                end = len(text) if out.finished else max(sent, len(text) - hold)
                yield Delta(
                    client_id,
                    out.new_token_ids,
                    text[sent:end],
                    out.finished,
                    out.usage,
                    out.finish_reason if out.finished else None,
                    ttft,
                    out.logprobs,
                    out.error,
                )
                sent = end
                if out.finished:
                    return
            # The backend ended without a finished output: still end the request's deltas properly.
            rest = detok.flush() if detok is not None else ""
            yield Delta(client_id, (), text[sent:] + rest, True, usage, "abort", ttft)
        finally:
            # Closing the backend's iterator is what aborts the request and frees its blocks.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def _prompt_ids(self, req: CompletionRequest) -> tuple[tuple[int, ...], str]:
        """The prompt's token ids and the name of the field they came from."""
        if req.prompt is not None and req.prompt_ids is not None:
            raise RequestError("prompt", "give either a text prompt or prompt_ids, not both")
        if req.messages is not None:
            if req.prompt is not None or req.prompt_ids is not None:
                raise RequestError("messages", "give either messages or a prompt, not both")
            tokenizer = self._require_tokenizer("messages")
            text = render_chat(req.messages, thinking=req.thinking)
            _check_len("messages", len(text), self.info.limits.max_prompt_chars, "characters (rendered chat)")
            # The rendered chat starts with BOS as text: it is the one BOS (router.chat).
            return tuple(tokenizer.encode(text, add_bos=False)), "messages"
        if req.prompt_ids is not None:
            ids = tuple(req.prompt_ids)
            if not ids:
                raise RequestError("prompt_ids", "the prompt is empty")
            vocab = self.info.vocab_size
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                    raise RequestError("prompt_ids", f"token id {t!r} is outside the vocabulary [0, {vocab})")
            return ids, "prompt_ids"
        if not req.prompt:
            raise RequestError("prompt", "the prompt is empty")
        ids = tuple(self._require_tokenizer("prompt").encode(req.prompt))
        if not ids:
            raise RequestError("prompt", "the prompt encodes to no tokens")
        return ids, "prompt"

    def _require_tokenizer(self, field_name: str) -> Tokenizer:
        if self.tokenizer is None:
            raise RequestError(
                field_name,
                f"model {self.info.model_id!r} has no tokenizer (no tokenizer.json): send prompt_ids",
            )
        return self.tokenizer


_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos", "logprobs")
_JSON_TYPES = {
    "prompt": "a string",
    "prompt_ids": "a list of integers",
    "max_tokens": "an integer",
    "temperature": "a number",
    "top_p": "a number",
    "top_k": "an integer",
    "seed": "an integer",
    "stop": "a string or a list of strings",
    "stop_token_ids": "a list of integers",
    "ignore_eos": "a boolean",
    "logprobs": "an integer",
    "cache_salt": "a string",
    "priority": "an integer",
    "thinking": "a boolean",
}
_JSON_FIELDS = frozenset(_JSON_TYPES) | {"id", "request_id", "messages"}  # messages: router.chat


def _is(value: Any, kind: str) -> bool:
    """Whether a JSON value has the kind named in ``_JSON_TYPES`` (bools are not numbers here)."""

    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if kind == "an integer":
        return integer(value)
    if kind == "a number":
        return integer(value) or isinstance(value, float)
    if kind == "a boolean":
        return isinstance(value, bool)
    if kind == "a string":
        return isinstance(value, str)
    if kind == "a list of integers":
        return isinstance(value, (list, tuple)) and all(integer(v) for v in value)
    return isinstance(value, str) or isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def tenant_salt(tenant: str | None, cache_salt: str | None) -> str | None:
    """The cache salt the engines hash: the client's salt, joined (when the server knows the caller's
    tenant, e.g. its API key) with a digest of the tenant, so no tenant's prefix cache hit can reveal
    another tenant's prompt. The digest keeps the key itself out of block hashes and the index."""
    if tenant is None:
        return cache_salt or None
    digest = hashlib.sha256(tenant.encode()).hexdigest()[:32]
    return f"tenant:{digest}|{cache_salt or ''}"


def _check_len(field_name: str, n: int, limit: int, unit: str) -> None:
    if n > limit:
        raise RequestError(field_name, f"at most {limit} {unit}, got {n}")


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Index of the earliest stop string in ``text[start:]``, or None."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None
