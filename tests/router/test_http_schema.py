"""Property test from the HTTP app's own OpenAPI document (schemathesis, ASGI in process): whatever a
client sends to any operation, the answer is never a 5xx, and every error is an OpenAI error object.

Everything is real: a LocalBackend (prefill and decode engines) on the tiny checkpoint, with a short
context so that no generated example runs long."""

from __future__ import annotations

import json

import pytest
import schemathesis
import schemathesis.specs.openapi.schemas  # noqa: F401 — now, at collection: see below
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from cluster.local import LocalBackend
from router.frontend import Frontend
from router.http import build_app
from workers.engine.config import EngineConfig


# schemathesis loads its OpenAPI module lazily, through pytest's assertion rewriter (it is a plugin), so
# the module is imported above, while collecting and before any engine thread runs (tests/conftest.py
# tells why parsing beside such threads can fail).
@pytest.fixture(scope="module")
def openai_schema(tiny_dir, tokenizer):
    config = EngineConfig(max_model_len=48, num_blocks=64, block_size=16)
    with LocalBackend.start(tiny_dir, engine_config=config) as backend:
        app = build_app(Frontend(backend, tokenizer), api_keys=frozenset())
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


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
    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    def run(case) -> None:
        case.call_and_validate(checks=[not_a_server_error, openai_error_object])

    run()
