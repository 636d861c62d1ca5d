"""Property test from the HTTP app's own OpenAPI document (schemathesis, ASGI in process): whatever a
client sends to any operation, the answer is never a 5xx, and every error is an OpenAI error object.

The Frontend and tokenizer are real; the backend is an instant fake that yields real token ids and
log-probabilities, so the examples exercise validation, streaming and response building, not the
model's speed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import schemathesis
import schemathesis.specs.openapi.schemas  # noqa: F401 — now, at collection: see below
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from router.backend import ModelInfo
from router.frontend import Frontend
from router.limits import RequestLimits
from router.http import build_app
from workers.engine.types import GenerateRequest, RequestOutput, TokenLogprob, Usage


class InstantBackend:
    """Generates ``max_tokens`` tokens at once (ids cycling through a small range of real tokens)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def info(self) -> ModelInfo:
        return ModelInfo(model_id="tiny", vocab_size=self.vocab_size, max_context=256, max_tokens_limit=255,
                         max_queue=64, block_size=16, eos_token_id=1, bos_token_id=0, index_topk=8,
                         has_tokenizer=True, limits=RequestLimits().resolved(max_context=256, max_queue=64))

    async def health(self) -> str | None:
        return None

    async def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        n, prompt = req.params.max_tokens, len(req.prompt_token_ids)
        for i in range(n):
            top = tuple((100 + j, -1.0 - j) for j in range(req.params.logprobs or 0))
            lps = (TokenLogprob(100 + i % 50, -0.5, top),) if req.params.logprobs is not None else ()
            last = i == n - 1
            yield RequestOutput(req.request_id, (100 + i % 50,), last, Usage(prompt, 0, i + 1),
                                "length" if last else None, lps)

    def stats(self) -> dict:
        return {"mode": "fake", "router": {}, "workers": []}


# schemathesis loads its OpenAPI module lazily, through pytest's assertion rewriter (it is a plugin);
# after earlier tests, CPython 3.11.7's ast.parse can fail there with "AST constructor recursion depth
# mismatch", so the module is imported above, while collecting.
@pytest.fixture(scope="module")
def openai_schema(tokenizer):
    app = build_app(Frontend(InstantBackend(tokenizer.vocab_size), tokenizer), api_keys=frozenset())
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def openai_error_object(ctx, response, case) -> bool | None:
    """Every 4xx body is ``{"error": {"message", "type", "param", "code"}}``."""
    if 400 <= response.status_code < 500:
        body = json.loads(response.content)
        assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return None


def operations() -> list[str]:
    return ["GET /v1/models", "GET /v1/models/{model}", "POST /v1/completions", "POST /v1/chat/completions",
            "GET /health"]


# schemathesis.pytest.from_fixture does not run under this pytest (9.2): Hypothesis drives each
# operation's strategy directly instead.
@pytest.mark.parametrize("label", operations())
def test_no_server_errors(openai_schema, label: str) -> None:
    found = {op.ok().label: op.ok() for op in openai_schema.get_all_operations()}
    assert set(found) == set(operations())  # the document lists every endpoint (and nothing else)

    @given(case=found[label].as_strategy())
    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    def run(case) -> None:
        case.call_and_validate(checks=[not_a_server_error, openai_error_object])

    run()
