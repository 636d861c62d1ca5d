"""One batch line: read from an input file, run through the Frontend, written to an output file.

Input (OpenAI's batch format, one JSON object per line)::

    {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

A line that cannot be read (not JSON, no ``custom_id``, a ``custom_id`` seen before in the job, a
``url`` other than the job's endpoint, a method other than POST) becomes a failed line with a precise
message; the other lines run. Output lines are OpenAI's: the output file holds
``{"id", "custom_id", "response": {"status_code": 200, "request_id", "body"}, "error": null}`` and the
error file the same with the endpoint's 4xx/5xx status and its error object as the body (a line that
could not be read has ``response: null`` and ``error: {"code", "message"}``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from google.protobuf import json_format
from pydantic import ValidationError

from router.backend import AdmissionError, BackendUnavailable
from router.frontend import Completion, CompletionRequest, Frontend
from router.http.convert import Converted, chat_request, completion_request, openai_names
from router.http.errors import APIError, to_api_error, validation_error
from router.http.openai_types import ChatCompletionBody, CompletionBody
from router.http.responses import ResponseFormat
from router.jobs.types import GRPC_LINE, Job, JobLimits, JobLine, LineResult
from router.proto.dsaserve.v1 import dsaserve_pb2 as pb
from workers.engine.types import RequestError, TokenLogprob, Usage

# gRPC code names for the HTTP statuses a line can end with.
GRPC_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT",
              429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


class Retry(Exception):
    """The line could not run now but may later (a full queue, no healthy worker): not a result."""

    def __init__(self, wait_s: float, why: str) -> None:
        super().__init__(why)
        self.wait_s = wait_s


def parse_input(data: bytes, endpoint: str, limits: JobLimits) -> list[JobLine]:
    """The lines of an uploaded file (blank lines skipped). Raises RequestError("input_file_id") for a
    file that is not UTF-8, holds no line, or holds more than ``limits.max_lines_per_job``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError("input_file_id", f"the file is not UTF-8 text (byte {e.start})") from None
    raw = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not raw:
        raise RequestError("input_file_id", "the file holds no request line")
    if len(raw) > limits.max_lines_per_job:
        raise RequestError("input_file_id", f"{len(raw)} lines; at most {limits.max_lines_per_job} per job")
    lines: list[JobLine] = []
    first: dict[str, int] = {}
    for index, (n, line) in enumerate(raw):
        parsed = _parse_line(index, n, line, endpoint, limits)
        if parsed.error is None:
            if parsed.custom_id in first:
                parsed = _bad(index, parsed.custom_id, f"line {n}: custom_id {parsed.custom_id!r} repeats line "
                              f"{first[parsed.custom_id]}; custom_id must be unique in a job", "duplicate_custom_id")
            else:
                first[parsed.custom_id] = n
        lines.append(parsed)
    return lines


def grpc_lines(requests: list[pb.GenerateRequest]) -> list[JobLine]:
    """Lines of a job given inline through gRPC; ``request_id`` is the custom id (unique in the job)."""
    lines, first = [], {}
    for index, msg in enumerate(requests):
        custom_id = msg.request_id or f"line-{index + 1}"
        body = json_format.MessageToDict(msg, preserving_proto_field_name=True)
        if custom_id in first:
            lines.append(_bad(index, custom_id, f"request {index + 1}: request_id {custom_id!r} repeats request "
                              f"{first[custom_id]}; it must be unique in a job", "duplicate_custom_id"))
            continue
        first[custom_id] = index + 1
        lines.append(JobLine(index, custom_id, GRPC_LINE, body))
    return lines


def _parse_line(index: int, n: int, line: str, endpoint: str, limits: JobLimits) -> JobLine:
    if len(line) > limits.max_line_chars:
        return _bad(index, f"line-{n}", f"line {n} is {len(line)} characters; at most {limits.max_line_chars}")
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        return _bad(index, f"line-{n}", f"line {n} is not JSON: {e.msg}")
    if not isinstance(d, dict):
        return _bad(index, f"line-{n}", f"line {n} is not a JSON object")
    custom_id = d.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _bad(index, f"line-{n}", f"line {n}: custom_id must be a non-empty string")
    unknown = sorted(set(d) - {"custom_id", "method", "url", "body"})
    if unknown:
        return _bad(index, custom_id, f"line {n}: unknown field {unknown[0]!r}")
    if d.get("method", "POST") != "POST":
        return _bad(index, custom_id, f"line {n}: method must be POST, got {d.get('method')!r}")
    if d.get("url") != endpoint:
        return _bad(index, custom_id, f"line {n}: url must be the batch's endpoint {endpoint!r}, got {d.get('url')!r}")
    if not isinstance(d.get("body"), dict):
        return _bad(index, custom_id, f"line {n}: body must be a JSON object")
    return JobLine(index, custom_id, endpoint, d["body"])


def _bad(index: int, custom_id: str, message: str, code: str = "invalid_line") -> JobLine:
    return JobLine(index, custom_id, "", None, error={"code": code, "message": message})


async def run_line(frontend: Frontend, job: Job, line: JobLine, *, model_id: str, priority: int) -> LineResult:
    """The result of one line. Raises ``Retry`` when it should run again later."""
    if line.error is not None:
        return LineResult(line.index, line.custom_id, error={**line.error, "param": None, "status": 400})
    try:
        req, names = await _request(frontend, line, model_id=model_id, tenant=job.tenant or None)
        req = dataclasses.replace(req, request_id=f"{job.id}-{line.index}", priority=priority)
        with openai_names(names):
            completion = await frontend.complete(req)
    except AdmissionError as e:
        raise Retry(max(e.retry_after_s, 0.05), str(e)) from None
    except BackendUnavailable as e:
        raise Retry(1.0, str(e) or "no healthy worker") from None
    except (RequestError, APIError, Exception) as e:  # noqa: BLE001 — one line's failure is its result
        err = to_api_error(e)
        return LineResult(line.index, line.custom_id, error={"code": err.code or GRPC_CODES.get(err.status, "INTERNAL"),
                                                             "message": err.message, "param": err.param,
                                                             "status": err.status})
    if completion.finish_reason == "abort":
        raise Retry(1.0, "the request ended before it finished")
    if completion.finish_reason == "error":
        return LineResult(line.index, line.custom_id, error={"code": "INTERNAL", "param": None, "status": 500,
                                                             "message": completion.error or "the engine failed"})
    return LineResult(line.index, line.custom_id, completion=completion.to_json())


async def _request(frontend: Frontend, line: JobLine, *, model_id: str,
                   tenant: str | None) -> tuple[CompletionRequest, dict[str, str]]:
    if line.url == GRPC_LINE:
        from router import wire

        msg = json_format.ParseDict(line.body, pb.GenerateRequest())
        return dataclasses.replace(wire.request_from_proto(msg), tenant=tenant), {}
    converted = await _openai(frontend, line, model_id, tenant)
    return converted.request, converted.names


async def _openai(frontend: Frontend, line: JobLine, model_id: str, tenant: str | None) -> Converted:
    body_type = ChatCompletionBody if line.url == "/v1/chat/completions" else CompletionBody
    try:
        body = body_type.model_validate(line.body)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    if body.stream:
        raise APIError(400, "stream: a batch line cannot stream", param="stream")
    if body.model and body.model != model_id:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_id!r}",
                       param="model", code="model_not_found")
    if line.url == "/v1/chat/completions":
        return await chat_request(body, frontend, model_id, tenant)
    return completion_request(body, frontend, model_id, tenant)


def output_line(line: JobLine, result: LineResult, *, model_id: str, frontend: Frontend,
                created: int) -> tuple[dict[str, Any], bool]:
    """The OpenAI output-file line of a result, and whether it belongs in the error file."""
    rid = f"batch_req_{result.index}"
    if result.error is not None:
        if result.error.get("code") in ("invalid_line", "duplicate_custom_id"):
            return {"id": rid, "custom_id": result.custom_id, "response": None,
                    "error": {"code": result.error["code"], "message": result.error["message"]}}, True
        body = APIError(result.error["status"], result.error["message"], param=result.error.get("param"),
                        code=result.error.get("code"), type="invalid_request_error"
                        if result.error["status"] < 500 else "server_error").body()
        return {"id": rid, "custom_id": result.custom_id,
                "response": {"status_code": result.error["status"], "request_id": rid, "body": body},
                "error": None}, True
    completion = completion_from_json(result.completion)
    chat = line.url == "/v1/chat/completions"
    thinking = chat and _thinking(line.body)
    fmt = ResponseFormat(chat=chat, model=model_id, tokenizer=frontend.tokenizer, thinking=thinking, created=created)
    body = fmt.whole(completion) if line.url != GRPC_LINE else result.completion
    return {"id": rid, "custom_id": result.custom_id,
            "response": {"status_code": 200, "request_id": completion.request_id, "body": body}, "error": None}, False


def _thinking(body: dict[str, Any] | None) -> bool:
    try:
        return ChatCompletionBody.model_validate(body).thinking_mode()
    except (ValidationError, RequestError):
        return False


def completion_from_json(d: dict[str, Any]) -> Completion:
    """The inverse of ``Completion.to_json``."""
    u = d["usage"]
    return Completion(
        request_id=d["request_id"], token_ids=tuple(d["token_ids"]), text=d["text"],
        finish_reason=d["finish_reason"],
        usage=Usage(u["prompt_tokens"], u["cached_tokens"], u["completion_tokens"]),
        ttft_s=None if d.get("ttft_ms") is None else d["ttft_ms"] / 1000.0,
        logprobs=tuple(TokenLogprob(lp["token_id"], lp["logprob"], tuple(tuple(t) for t in lp["top"]))
                       for lp in d.get("logprobs", ())),
        error=d.get("error"),
    )
