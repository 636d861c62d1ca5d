"""Protobuf ↔ typed objects, for the server and the clients: the only code that touches ``*_pb2``
messages field by field (protobuf stays at the wire)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from router.backend import ModelInfo
from router.chat import ChatMessage
from router.frontend import Completion, CompletionRequest, Delta
from router.limits import RequestLimits
from router.proto.dsaserve.v1 import dsaserve_pb2 as pb
from workers.engine.types import SamplingParams, TokenLogprob, TransferStats, Usage, WorkerStats

# Trailing metadata keys: the offending field of an INVALID_ARGUMENT, and gRPC's standard retry
# pushback (milliseconds) of a RESOURCE_EXHAUSTED.
FIELD_KEY = "dsaserve-field"
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
# The same facts in the details, for proxies that drop trailing metadata on errors (Ray Serve's).
_FIELD_IN_DETAILS = re.compile(r"^([a-z_]+): ")
_RETRY_IN_DETAILS = re.compile(r"retry after ([0-9.]+) s")


def error_facts(code: str, details: str, trailing: dict) -> tuple[str | None, float | None]:
    """(offending field, retry-after seconds) of a failed call: from the trailing metadata, else from
    the details ("FIELD: ..." of an INVALID_ARGUMENT, "retry after N s" of a RESOURCE_EXHAUSTED)."""
    field = trailing.get(FIELD_KEY)
    if field is None and code == "INVALID_ARGUMENT" and (m := _FIELD_IN_DETAILS.match(details)):
        field = m.group(1)
    retry = trailing.get(RETRY_PUSHBACK_KEY)
    if retry is not None:
        return field, int(retry) / 1000.0
    m = _RETRY_IN_DETAILS.search(details) if code == "RESOURCE_EXHAUSTED" else None
    return field, float(m.group(1)) if m else None


@dataclass(frozen=True)
class ErrorInfo:
    """A per-request failure (GenerateBatch) or a call's status, in plain terms."""

    code: str  # gRPC status code name
    message: str
    field: str | None = None
    retry_after_s: float | None = None


# ---- requests -------------------------------------------------------------------------------


def request_to_proto(req: CompletionRequest, *, stream: bool = False) -> pb.GenerateRequest:
    p = req.params
    msg = pb.GenerateRequest(
        request_id=req.request_id or "",
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        stop_token_ids=list(p.stop_token_ids),
        stop=list(p.stop),
        ignore_eos=p.ignore_eos,
        cache_salt=req.cache_salt or "",
        priority=req.priority,
        stream=stream,
    )
    if req.prompt_ids is not None:
        msg.prompt_ids.ids.extend(req.prompt_ids)
    elif req.prompt is not None:
        msg.text = req.prompt
    elif req.messages is not None:
        msg.messages.CopyFrom(chat_to_proto(req.messages, thinking=req.thinking))
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def request_from_proto(msg: pb.GenerateRequest) -> CompletionRequest:
    """The typed request; absent optional fields take ``SamplingParams``' defaults."""
    kwargs: dict[str, Any] = {}
    for name in ("max_tokens", "temperature", "top_p", "seed", "logprobs"):
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    params = SamplingParams(
        top_k=msg.top_k,
        stop_token_ids=tuple(msg.stop_token_ids),
        stop=tuple(msg.stop),
        ignore_eos=msg.ignore_eos,
        **kwargs,
    )
    which = msg.WhichOneof("prompt")
    messages, thinking = chat_from_proto(msg.messages) if which == "messages" else (None, False)
    return CompletionRequest(
        prompt=msg.text if which == "text" else None,
        prompt_ids=tuple(msg.prompt_ids.ids) if which == "prompt_ids" else None,
        params=params,
        request_id=msg.request_id or None,
        cache_salt=msg.cache_salt or None,
        priority=msg.priority,
        messages=messages,
        thinking=thinking,
    )


def chat_to_proto(messages: tuple[ChatMessage, ...], *, thinking: bool = False) -> pb.ChatMessages:
    return pb.ChatMessages(
        messages=[pb.ChatMessage(role=m.role, content=m.content) for m in messages], thinking=thinking
    )


def chat_from_proto(msg: pb.ChatMessages) -> tuple[tuple[ChatMessage, ...], bool]:
    """(messages, thinking), unchecked: roles are validated where the chat is rendered."""
    return tuple(ChatMessage(m.role, m.content) for m in msg.messages), msg.thinking


def tokenize_request_to_proto(
    text: str = "", *, add_bos: bool | None = None, messages: tuple[ChatMessage, ...] | None = None,
    thinking: bool = False,
) -> pb.TokenizeRequest:
    """A Tokenize call for ``text`` or, when given, the rendered chat ``messages``."""
    msg = pb.TokenizeRequest(text=text)
    if add_bos is not None:
        msg.add_bos = add_bos
    if messages is not None:
        msg.messages.CopyFrom(chat_to_proto(messages, thinking=thinking))
    return msg


# ---- responses ------------------------------------------------------------------------------


def delta_to_proto(d: Delta) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(
        request_id=d.request_id,
        token_ids=list(d.token_ids),
        text=d.text,
        finished=d.finished,
        finish_reason=d.finish_reason or "",
        usage=_usage_to_proto(d.usage),
        logprobs=[_logprob_to_proto(lp) for lp in d.logprobs],
    )
    if d.ttft_s is not None:
        msg.ttft_ms = d.ttft_s * 1000.0
    if d.error:
        msg.error.CopyFrom(pb.Error(code="INTERNAL", message=d.error))
    return msg


def completion_to_proto(c: Completion) -> pb.GenerateResponse:
    delta = Delta(c.request_id, c.token_ids, c.text, True, c.usage, c.finish_reason, c.ttft_s, c.logprobs, c.error)
    return delta_to_proto(delta)


def delta_from_proto(msg: pb.GenerateResponse) -> Delta:
    return Delta(
        request_id=msg.request_id,
        token_ids=tuple(msg.token_ids),
        text=msg.text,
        finished=msg.finished,
        usage=Usage(msg.usage.prompt_tokens, msg.usage.cached_tokens, msg.usage.completion_tokens),
        finish_reason=msg.finish_reason or None,
        ttft_s=msg.ttft_ms / 1000.0 if msg.HasField("ttft_ms") else None,
        logprobs=tuple(_logprob_from_proto(lp) for lp in msg.logprobs),
        error=msg.error.message if msg.HasField("error") else None,
    )


def error_to_proto(request_id: str, err: ErrorInfo) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=request_id,
        finished=True,
        finish_reason="error",
        error=pb.Error(
            code=err.code, field=err.field or "", message=err.message, retry_after_s=err.retry_after_s or 0.0
        ),
    )


def error_from_proto(msg: pb.GenerateResponse) -> ErrorInfo | None:
    """Why a batch request failed (rejected, or finished by the engine with an error), or None."""
    if not msg.HasField("error"):
        return None
    e = msg.error
    return ErrorInfo(e.code, e.message, e.field or None, e.retry_after_s or None)


# ---- models ---------------------------------------------------------------------------------


def model_to_proto(info: ModelInfo) -> pb.Model:
    return pb.Model(
        id=info.model_id,
        vocab_size=info.vocab_size,
        max_context=info.max_context,
        limits=pb.Limits(
            max_tokens=info.max_tokens_limit,
            max_queue=info.max_queue,
            block_size=info.block_size,
            index_topk=info.index_topk,
            **info.limits.to_json(),
        ),
        has_tokenizer=info.has_tokenizer,
        bos_token_id=info.bos_token_id,
        eos_token_id=info.eos_token_id,
    )


def model_from_proto(m: pb.Model) -> ModelInfo:
    return ModelInfo(
        model_id=m.id,
        vocab_size=m.vocab_size,
        max_context=m.max_context,
        max_tokens_limit=m.limits.max_tokens,
        max_queue=m.limits.max_queue,
        block_size=m.limits.block_size,
        eos_token_id=m.eos_token_id,
        bos_token_id=m.bos_token_id,
        index_topk=m.limits.index_topk,
        has_tokenizer=m.has_tokenizer,
        limits=RequestLimits(**{name: getattr(m.limits, name) for name in RequestLimits.names()}),
    )


def _usage_to_proto(u: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, cached_tokens=u.cached_tokens, completion_tokens=u.completion_tokens)


def _logprob_to_proto(lp: TokenLogprob) -> pb.TokenLogprob:
    top = [pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top=top)


def _logprob_from_proto(lp: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))


def status_to_proto(status: dict) -> pb.StatusResponse:
    """Backend ``stats()`` → StatusResponse (router counters the message has no field for are dropped)."""
    router = status["router"]
    return pb.StatusResponse(
        mode=status["mode"],
        router=pb.RouterStatus(requests_total=router["requests_total"], in_flight=router["in_flight"],
                               errors_total=router["errors_total"]),
        workers=[_worker_to_proto(w) for w in status["workers"]],
    )


def status_from_proto(msg: pb.StatusResponse) -> dict:
    """StatusResponse → the JSON ``dsaserve status --json`` prints (numbers stay numbers); each worker
    is ``WorkerStats.to_json()`` (no ``ep`` block: the message has none)."""
    r = msg.router
    return {
        "mode": msg.mode,
        "router": {"requests_total": r.requests_total, "in_flight": r.in_flight, "errors_total": r.errors_total},
        "workers": [_worker_from_proto(w).to_json() for w in msg.workers],
    }


def _worker_to_proto(w: WorkerStats) -> pb.WorkerStatus:
    kv = w.kv_transfer
    return pb.WorkerStatus(
        id=w.worker_id, role=w.role, requests_total=w.requests_total, running=w.running, waiting=w.waiting,
        free_blocks=w.free_blocks, total_blocks=w.total_blocks, tokens_per_s=w.tokens_per_s, healthy=w.healthy,
        indexed=bool(w.indexed), queued_tokens=w.queued_tokens, weight_bytes=w.weight_bytes,
        kv_bytes_per_token=w.kv_bytes_per_token,
        kv_transfer=pb.KVTransferStats(backend=kv.backend, bytes=kv.bytes, transfers=kv.transfers, failures=kv.failures),
        context_cache_hits=w.context_cache_hits, disk_volume=w.disk_volume or "",
        peer_pulls=pb.PeerPullStats(**w.peer_pulls) if w.peer_pulls else None,
    )


def _worker_from_proto(w: pb.WorkerStatus) -> WorkerStats:
    kv = w.kv_transfer
    return WorkerStats(
        worker_id=w.id, role=w.role, waiting=w.waiting, running=w.running, free_blocks=w.free_blocks,
        total_blocks=w.total_blocks, tokens_per_s=w.tokens_per_s, requests_total=w.requests_total,
        queued_tokens=w.queued_tokens, healthy=w.healthy, indexed=w.indexed,
        kv_transfer=TransferStats(kv.backend, kv.bytes, kv.transfers, kv.failures),
        weight_bytes=w.weight_bytes, kv_bytes_per_token=w.kv_bytes_per_token,
        context_cache_hits=dict(w.context_cache_hits), disk_volume=w.disk_volume or None,
        peer_pulls={f.name: getattr(w.peer_pulls, f.name) for f in w.peer_pulls.DESCRIPTOR.fields}
        if w.HasField("peer_pulls") else {},
    )
