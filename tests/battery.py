"""The bad-input battery: every field of every RPC, sent raw (no client-side checks), against a real
server in local or cluster mode. Each case expects a precise status (and the field it names); after
each one a normal request must still get the reference tokens.

Cases are built from the server's own ``ListModels`` (vocabulary, context, limits), so the same table
runs against any model and any configured limits.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from router import wire
from router.backend import ModelInfo
from router.client import AsyncClient, DsaServeError
from router.proto.dsaserve.v1 import dsaserve_pb2 as pb
from router.proto.dsaserve.v1 import dsaserve_pb2_grpc as pb_grpc

OK = "OK"
GOOD_IDS = [0, 11, 22, 33]
GOOD = {"max_tokens": 3, "ignore_eos": True}


@dataclass(frozen=True)
class Case:
    name: str
    msg: pb.GenerateRequest
    code: str  # expected status name, or OK: accepted and finished
    field: str | None = None


def msg(ids: list[int] | None = None, text: str | None = None, **fields) -> pb.GenerateRequest:
    m = pb.GenerateRequest(**{"max_tokens": 2, "ignore_eos": True, **fields})
    if ids is not None:
        m.prompt_ids.SetInParent()
        m.prompt_ids.ids.extend(ids)
    if text is not None:
        m.text = text
    return m


def cases(info: ModelInfo, *, message_limit: bool = True) -> list[Case]:
    """The battery for a server whose ListModels says ``info``. ``message_limit``: include the
    over-size message (a local server enforces ``max_message_bytes`` itself)."""
    v, c, lim = info.vocab_size, info.max_context, info.limits
    ids = [1, 2, 3]
    bad = "INVALID_ARGUMENT"
    table = [
        Case("request_id-too-long", msg(ids, request_id="r" * (lim.max_request_id_chars + 1)), bad, "request_id"),
        Case("no-prompt", msg(), bad, "prompt"),
        Case("empty-text", msg(text=""), bad, "prompt"),
        Case("text-too-long", msg(text="a" * (lim.max_prompt_chars + 1)), bad, "prompt"),
        Case("empty-ids", msg([]), bad, "prompt_ids"),
        Case("id-eq-vocab", msg([1, v]), bad, "prompt_ids"),
        Case("id-negative", msg([-1]), bad, "prompt_ids"),
        Case("id-huge", msg([2**62]), bad, "prompt_ids"),
        Case("ids-fill-context", msg([1] * c), bad, "prompt_ids"),
        Case("max_tokens-zero", msg(ids, max_tokens=0), bad, "max_tokens"),
        Case("max_tokens-negative", msg(ids, max_tokens=-5), bad, "max_tokens"),
        Case("max_tokens-over-limit", msg(ids, max_tokens=info.max_tokens_limit + 1), bad, "max_tokens"),
        Case("max_tokens-huge", msg(ids, max_tokens=2**62), bad, "max_tokens"),
        Case("max_tokens-over-context", msg([1] * (c - 2), max_tokens=3), bad, "max_tokens"),
        Case("temperature-negative", msg(ids, temperature=-1.0), bad, "temperature"),
        Case("temperature-nan", msg(ids, temperature=math.nan), bad, "temperature"),
        Case("temperature-inf", msg(ids, temperature=math.inf), bad, "temperature"),
        Case("temperature-over", msg(ids, temperature=100.5), bad, "temperature"),
        Case("top_p-zero", msg(ids, top_p=0.0), bad, "top_p"),
        Case("top_p-negative", msg(ids, top_p=-0.1), bad, "top_p"),
        Case("top_p-over", msg(ids, top_p=1.5), bad, "top_p"),
        Case("top_p-nan", msg(ids, top_p=math.nan), bad, "top_p"),
        Case("top_k-negative", msg(ids, top_k=-1), bad, "top_k"),
        Case("top_k-over-vocab", msg(ids, top_k=v + 1), bad, "top_k"),
        Case("seed-negative", msg(ids, seed=-1), bad, "seed"),
        Case("stop_token_ids-vocab", msg(ids, stop_token_ids=[v]), bad, "stop_token_ids"),
        Case("stop_token_ids-negative", msg(ids, stop_token_ids=[-1]), bad, "stop_token_ids"),
        Case("stop_token_ids-too-many", msg(ids, stop_token_ids=[0] * (lim.max_stop_token_ids + 1)), bad,
             "stop_token_ids"),
        Case("stop-empty", msg(ids, stop=[""]), bad, "stop"),
        Case("stop-too-many", msg(ids, stop=["x"] * (lim.max_stop_strings + 1)), bad, "stop"),
        Case("stop-too-long", msg(ids, stop=["x" * (lim.max_stop_string_chars + 1)]), bad, "stop"),
        Case("logprobs-negative", msg(ids, logprobs=-1), bad, "logprobs"),
        Case("logprobs-over", msg(ids, logprobs=21), bad, "logprobs"),
        Case("cache_salt-too-long", msg(ids, cache_salt="s" * (lim.max_cache_salt_chars + 1)), bad, "cache_salt"),
        # Accepted extremes: each must run to the end.
        Case("temperature-tiny", msg(ids, temperature=1e-40, seed=1), OK),
        Case("temperature-max", msg(ids, temperature=100.0, seed=1), OK),
        Case("top_p-tiny", msg(ids, temperature=1.0, top_p=1e-300, seed=1), OK),
        Case("top_k-vocab", msg(ids, temperature=1.0, top_k=v, seed=2**63 - 1), OK),
        Case("priority-min", msg(ids, priority=-(2**31)), OK),
        Case("priority-max", msg(ids, priority=2**31 - 1), OK),
        Case("logprobs-max", msg(ids, logprobs=20), OK),
        Case("stop-at-limits", msg(ids, stop=["\x00" * lim.max_stop_string_chars] * lim.max_stop_strings), OK),
        Case("stop_token_ids-at-limit", msg(ids, stop_token_ids=[v - 1] * lim.max_stop_token_ids), OK),
        Case("request_id-at-limit", msg(ids, request_id="r" * lim.max_request_id_chars), OK),
        Case("cache_salt-at-limit", msg(ids, cache_salt="s" * lim.max_cache_salt_chars), OK),
    ]
    if message_limit:
        # int64 ids of 7 bytes each: a message just over the server's size limit
        table.append(Case("message-too-large", msg([2**48] * (lim.max_message_bytes // 7 + 1)), "RESOURCE_EXHAUSTED"))
    return table


def call_generate(stub: pb_grpc.DsaServeStub, m: pb.GenerateRequest, metadata=None) -> tuple[str, str | None, list]:
    """(status name, the dsaserve-field trailer, responses) of one streaming Generate."""
    stream = pb.GenerateRequest()
    stream.CopyFrom(m)
    stream.stream = True
    call = stub.Generate(stream, timeout=120, metadata=metadata)
    try:
        responses = list(call)
    except grpc.RpcError as e:
        field, _ = wire.error_facts(e.code().name, e.details() or "", dict(e.trailing_metadata() or ()))
        return e.code().name, field, []
    return OK, None, responses


def run_battery(channel: grpc.Channel, reference: tuple[int, ...], *, message_limit: bool = True,
                metadata=None) -> list[str]:
    """Send every case, each followed by a good request; returns the mismatches (empty: all held)."""
    stub = pb_grpc.DsaServeStub(channel)
    (model,) = stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=metadata).models
    info = wire.model_from_proto(model)
    problems: list[str] = []
    for case in cases(info, message_limit=message_limit):
        code, field, responses = call_generate(stub, case.msg, metadata)
        if code != case.code or (case.field is not None and field != case.field):
            problems.append(f"{case.name}: got {code} field={field}, want {case.code} field={case.field}")
        elif code == OK and not (responses and responses[-1].finished and responses[-1].finish_reason != "error"):
            problems.append(f"{case.name}: accepted but did not finish cleanly: {responses[-1:]}")
        code, _, responses = call_generate(stub, msg(GOOD_IDS, **GOOD), metadata)
        tokens = tuple(t for r in responses for t in r.token_ids)
        if code != OK or tokens != reference:
            problems.append(f"{case.name}: the next good request got {code} {tokens}, want {reference}")
    problems += _other_rpcs(stub, info, metadata)
    return problems


OTHER_CHECKS = 5  # Tokenize, ListModels, Status, and GenerateBatch's bad and good request


def _other_rpcs(stub: pb_grpc.DsaServeStub, info: ModelInfo, metadata) -> list[str]:
    problems = []
    checks: list[tuple[str, Callable[[], object], str, str | None]] = [
        ("tokenize-too-long", lambda: stub.Tokenize(pb.TokenizeRequest(text="a" * (info.limits.max_prompt_chars + 1)),
                                                    timeout=30, metadata=metadata), "INVALID_ARGUMENT", "text"),
        ("list-models", lambda: stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=metadata), OK, None),
        ("status", lambda: stub.Status(pb.StatusRequest(), timeout=30, metadata=metadata), OK, None),
    ]
    for name, call, want, want_field in checks:
        try:
            call()
            code, field = OK, None
        except grpc.RpcError as e:
            code = e.code().name
            field, _ = wire.error_facts(code, e.details() or "", dict(e.trailing_metadata() or ()))
        if code != want or field != want_field:
            problems.append(f"{name}: got {code} field={field}, want {want} field={want_field}")
    # GenerateBatch: a bad request gets an error response naming its field; the good one its tokens.
    bad = msg([1, info.vocab_size], request_id="bad")
    good = msg(GOOD_IDS, request_id="good", **GOOD)
    out = {r.request_id: r for r in stub.GenerateBatch(iter([bad, good]), timeout=120, metadata=metadata)}
    if out.get("bad") is None or out["bad"].error.code != "INVALID_ARGUMENT" or out["bad"].error.field != "prompt_ids":
        problems.append(f"batch-bad: {out.get('bad')}")
    if out.get("good") is None or out["good"].HasField("error"):
        problems.append(f"batch-good: {out.get('good')}")
    return problems


async def overload(address: str, n: int, reference: tuple[int, ...], *, max_tokens: int = 12,
                   timeout: float = 180.0) -> dict:
    """``n`` concurrent greedy streams of the good request, every third cancelled after its first
    delta. Counts: ``done`` (all tokens, the reference's first), ``cancelled``, ``rejected``
    (RESOURCE_EXHAUSTED; ``pushback_missing`` of them without a retry hint), ``wrong_tokens``,
    ``other_errors``; ``max_reject_ms``: the slowest rejection."""
    out = {"streams": n, "done": 0, "cancelled": 0, "rejected": 0, "pushback_missing": 0, "wrong_tokens": 0,
           "other_errors": 0}
    reject_ms: list[float] = []

    async def one(client: AsyncClient, i: int) -> None:
        start = time.perf_counter()
        try:
            stream = client.generate_stream(prompt_ids=GOOD_IDS, **{**GOOD, "max_tokens": max_tokens})
            tokens: list[int] = []
            async for delta in stream:
                tokens.extend(delta.token_ids)
                if i % 3 == 0:
                    await stream.aclose()
                    out["cancelled"] += 1
                    return
            out["done" if tuple(tokens[: len(reference)]) == reference else "wrong_tokens"] += 1
        except DsaServeError as e:
            if e.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                out["other_errors"] += 1
                return
            out["rejected"] += 1
            out["pushback_missing"] += not (e.retry_after_s and e.retry_after_s > 0)
            reject_ms.append((time.perf_counter() - start) * 1000)

    async with AsyncClient(address, timeout=timeout) as client:
        await asyncio.gather(*(one(client, i) for i in range(n)))
    out["max_reject_ms"] = round(max(reject_ms), 1) if reject_ms else None
    return out
