"""OpenAI response objects from the Frontend's ``Completion``s and ``Delta``s, and the SSE stream.

One ``ResponseFormat`` per endpoint (``text_completion`` or ``chat.completion``) turns a whole
completion into a response body and a delta into stream chunks, so the streamed and the whole
answers of a request carry the same fields.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio

from router.chat import END_THINK
from router.frontend import Completion, Delta
from router.http.errors import engine_error, to_api_error
from router.tokenizer import Tokenizer
from workers.engine.types import TokenLogprob, Usage

# OpenAI's reasons; "abort" (the backend ended a stream early) has no OpenAI name and reads as "stop".
# "error" never gets here: it becomes an error object.
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "stop"}


def usage_json(u: Usage) -> dict[str, Any]:
    """OpenAI's usage plus DeepSeek's cache counters (``prompt_cache_hit/miss_tokens``)."""
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "prompt_cache_hit_tokens": u.cached_tokens,
        "prompt_cache_miss_tokens": u.prompt_tokens - u.cached_tokens,
    }


class ReasoningSplit:
    """Splits a thinking-mode reply into its reasoning (up to the first ``</think>``) and its content,
    as DeepSeek's API returns them (``reasoning_content`` / ``content``). Streamed text that could be
    the start of ``</think>`` is held back until it cannot."""

    def __init__(self) -> None:
        self.reasoning = True
        self.pending = ""

    def push(self, text: str, *, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) of the next piece of text."""
        if not self.reasoning:
            return "", text
        buf, self.pending = self.pending + text, ""
        at = buf.find(END_THINK)
        if at >= 0:
            self.reasoning = False
            return buf[:at], buf[at + len(END_THINK):]
        if final:
            return buf, ""
        keep = next((k for k in range(min(len(END_THINK) - 1, len(buf)), 0, -1) if buf.endswith(END_THINK[:k])), 0)
        self.pending = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], ""


@dataclass
class ResponseFormat:
    """How one request's results look on the wire. ``chat``: chat.completion(.chunk), else
    text_completion. ``tokenizer`` spells the tokens of logprobs (None: ``token_id:N``, as vLLM).
    ``thinking``: a chat in thinking mode, whose reasoning goes to ``reasoning_content``."""

    chat: bool
    model: str
    tokenizer: Tokenizer | None
    include_usage: bool = False
    thinking: bool = False
    created: int = 0

    def __post_init__(self) -> None:
        self.created = self.created or int(time.time())
        self._split = ReasoningSplit() if self.chat and self.thinking else None

    def response_id(self, request_id: str) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{request_id}"

    def whole(self, c: Completion) -> dict[str, Any]:
        """The non-streamed body of a finished completion (an ``"error"`` finish raises APIError)."""
        if c.finish_reason == "error":
            raise engine_error(c.error)
        choice: dict[str, Any] = {"index": 0, "finish_reason": FINISH_REASONS.get(c.finish_reason, c.finish_reason)}
        if self.chat and self.thinking:
            reasoning, content = ReasoningSplit().push(c.text, final=True)
            choice["message"] = {"role": "assistant", "content": content, "reasoning_content": reasoning}
        elif self.chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        choice["logprobs"] = self._logprobs(c.logprobs) if c.logprobs else None
        return {
            "id": self.response_id(c.request_id),
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage_json(c.usage),
        }

    def chunks(self, d: Delta, *, first: bool) -> list[dict[str, Any]]:
        """The stream chunks of one delta (the usage chunk is ``usage_chunk``'s)."""
        out = []
        if self.chat and first:
            out.append(self._chunk(d, {"delta": {"role": "assistant", "content": ""}, "logprobs": None}))
        text = self._delta_text(d.text, d.finished) if self.chat else {"text": d.text}
        # Without a tokenizer the text stays empty: a chunk per increment still shows progress.
        if any(text.values()) or d.logprobs or (self.tokenizer is None and d.token_ids and not d.finished):
            body: dict[str, Any] = {"delta": text or {"content": ""}} if self.chat else text
            body["logprobs"] = self._logprobs(d.logprobs) if d.logprobs else None
            out.append(self._chunk(d, body))
        if d.finished:
            body = {"delta": {}} if self.chat else {"text": ""}
            body["logprobs"] = None
            out.append(self._chunk(d, body, FINISH_REASONS.get(d.finish_reason or "abort", d.finish_reason)))
        return out

    def _delta_text(self, text: str, final: bool) -> dict[str, str]:
        """A chat delta's text fields; empty while a thinking reply holds text back."""
        if self._split is None:
            return {"content": text} if text else {}
        reasoning, content = self._split.push(text, final=final)
        return {k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v}

    def usage_chunk(self, d: Delta) -> dict[str, Any]:
        return {**self._envelope(d), "choices": [], "usage": usage_json(d.usage)}

    def _envelope(self, d: Delta) -> dict[str, Any]:
        return {
            "id": self.response_id(d.request_id),
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
        }

    def _chunk(self, d: Delta, choice: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        chunk = {**self._envelope(d), "choices": [{"index": 0, **choice, "finish_reason": finish_reason}]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _token(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _logprobs(self, lps: tuple[TokenLogprob, ...]) -> dict[str, Any]:
        if self.chat:
            return {"content": [
                {**self._entry(lp.token_id, lp.logprob),
                 "top_logprobs": [self._entry(t, v) for t, v in lp.top]}
                for lp in lps
            ]}
        tokens = [self._token(lp.token_id) for lp in lps]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{self._token(t): v for t, v in lp.top} for lp in lps],
            "text_offset": offsets,
        }

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        token = self._token(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def sse(data: Any) -> bytes:
    """One server-sent event carrying ``data`` as JSON (``[DONE]`` as itself)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def event_stream(first: Delta, deltas: AsyncIterator[Delta], fmt: ResponseFormat) -> AsyncIterator[bytes]:
    """The SSE body of a streamed request whose first delta is ``first``: chunks, then (with
    ``include_usage``) the usage chunk, then ``[DONE]``. An engine failure becomes an error event
    (``data: {"error": ...}``), which the OpenAI SDKs raise as ``APIError``. Ending early (the client
    went away) closes ``deltas``, which aborts the request and frees its KV blocks."""
    try:
        delta, is_first = first, True
        while True:
            if delta.finish_reason == "error":
                yield sse(engine_error(delta.error).body())
                break
            for chunk in fmt.chunks(delta, first=is_first):
                yield sse(chunk)
            is_first = False
            if delta.finished:
                if fmt.include_usage:
                    yield sse(fmt.usage_chunk(delta))
                break
            delta = await deltas.__anext__()
    except StopAsyncIteration:
        pass
    except Exception as exc:  # noqa: BLE001 — the status is sent already: report it in the stream
        yield sse(to_api_error(exc).body())
    finally:
        # Shielded: a disconnect cancels this task, and the abort must still reach the engine.
        with anyio.CancelScope(shield=True):
            await deltas.aclose()  # type: ignore[attr-defined]
    yield sse("[DONE]")
