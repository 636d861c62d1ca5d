"""OpenAI request bodies to ``CompletionRequest``s, and the response format each endpoint answers in.

Shared by the endpoints (``router.http.app``) and batch job lines (``router.jobs.lines``), so that a
line of a batch runs exactly as the same body sent to its endpoint would.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

from router.chat import parse_messages
from router.frontend import CompletionRequest, Frontend
from router.http.openai_types import COMPLETIONS_DEFAULT_MAX_TOKENS, ChatCompletionBody, CompletionBody
from router.http.responses import ResponseFormat
from workers.engine.types import RequestError

COMPLETION_NAMES = {"prompt_ids": "prompt"}


@dataclass(frozen=True)
class Converted:
    """A body as the Frontend runs it: the request, how to answer, and the client's names for the
    Frontend's fields (for errors)."""

    request: CompletionRequest
    format: ResponseFormat
    names: dict[str, str]


def completion_request(body: CompletionBody, frontend: Frontend, model_id: str, tenant: str | None) -> Converted:
    """``POST /v1/completions``. Raises RequestError under the client's field names."""
    with openai_names(COMPLETION_NAMES):
        body.check_unsupported()
        text, ids = body.prompt_fields()
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        req = CompletionRequest(prompt=text, prompt_ids=ids, params=body.sampling(max_tokens, body.logprobs),
                                cache_salt=body.cache_salt, tenant=tenant)
    fmt = ResponseFormat(chat=False, model=model_id, tokenizer=frontend.tokenizer, include_usage=body.include_usage)
    return Converted(req, fmt, COMPLETION_NAMES)


async def chat_request(body: ChatCompletionBody, frontend: Frontend, model_id: str, tenant: str | None) -> Converted:
    """``POST /v1/chat/completions``; without max_tokens the reply may use what the context leaves
    (as OpenAI and vLLM do), which takes rendering and tokenizing the chat once."""
    names = {"max_tokens": "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens",
             "logprobs": "top_logprobs", "prompt_ids": "messages"}
    with openai_names(names):
        body.check_unsupported()
        messages = parse_messages(body.messages)
        requested = body.requested_max_tokens()
        thinking = body.thinking_mode()
        req = CompletionRequest(messages=messages, thinking=thinking,
                                params=body.sampling(1 if requested is None else requested, body.logprobs_n()),
                                cache_salt=body.cache_salt, tenant=tenant)
        if requested is None:
            req = await _fill_context(frontend, req)
    fmt = ResponseFormat(chat=True, model=model_id, tokenizer=frontend.tokenizer,
                         include_usage=body.include_usage, thinking=thinking)
    return Converted(req, fmt, names)


async def _fill_context(frontend: Frontend, req: CompletionRequest) -> CompletionRequest:
    greq = await frontend.prepare_async(req)
    ids = greq.prompt_token_ids
    room = min(frontend.info.max_context - len(ids), frontend.info.max_tokens_limit)
    return dataclasses.replace(req, messages=None, thinking=False, prompt_ids=ids,
                               params=dataclasses.replace(req.params, max_tokens=max(room, 1)))


@contextmanager
def openai_names(names: dict[str, str]):
    """Report a Frontend field under the name the client used (``prompt_ids`` was its ``prompt``)."""
    try:
        yield
    except RequestError as e:
        if e.field not in names:
            raise
        message = str(e).removeprefix(f"{e.field}: ")
        raise RequestError(names[e.field], message) from None
