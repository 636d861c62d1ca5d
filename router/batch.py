"""Offline batch jobs over JSONL files (``dsaserve batch``): resumable, one result line per request.

Input lines are JSON objects as ``CompletionRequest.from_json`` reads them, with an ``id`` (a line
without one is ``line-N``, N counting from 1). Each result is appended and flushed as it finishes:
``{"id", "token_ids", "text", "finish_reason", "usage", "ttft_ms"}``, or ``{"id", "error": {"code",
"field", "message", "transient"}}`` for a line that could not run (an engine ``"error"`` finish keeps
its result fields and carries the ``error`` too).

Errors are *permanent* (``transient: false``: ``INVALID_ARGUMENT``, the line itself is wrong) or
*transient* (``transient: true``: ``RESOURCE_EXHAUSTED`` after ``admission_wait_s`` of a full queue,
``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ``ABORTED`` when a request ended unfinished, ``INTERNAL``,
an engine ``"error"`` finish). An error line without the ``transient`` key (an older output) counts
as transient when its code is one of those.

Resuming, and the rule for ids that appear more than once: the output is append-only and is never
rewritten; per id, **the last successful line is the result**, and an id without one has its last
error line as the result. A rerun skips the ids whose result is a success or a permanent error and
runs again the ids whose result is a transient error (their new line is appended; the old error line
stays but no longer counts). A torn last line is ignored (its id runs again). In the input, the first
line carrying an id is that id's request; a later line repeating it is not run and writes nothing
(``BatchSummary.duplicates`` lists it and a warning goes to stderr): an error line under the same id
could otherwise be taken for the result of the first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from router.backend import AdmissionError, BackendUnavailable
from router.frontend import CompletionRequest, Frontend
from workers.engine.types import RequestError

MAX_RETRY_WAIT_S = 1.0
ADMISSION_WAIT_S = 600.0  # a queue full for this long gives RESOURCE_EXHAUSTED (a rerun retries it)
TRANSIENT_CODES = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "INTERNAL"})


@dataclass(frozen=True)
class BatchItem:
    """One input line still to run: a request, or the error that keeps it from running."""

    id: str
    request: CompletionRequest | None
    error: RequestError | None = None


@dataclass(frozen=True)
class BatchSummary:
    done: int  # result lines written by this run
    failed: int  # of which error lines
    skipped: int  # input ids whose result is already in the output (a success or a permanent error)
    retried: int = 0  # input ids run again because their result was a transient error
    duplicates: tuple[str, ...] = ()  # "line N: id 'x' (first on line M)": input lines not run


@dataclass
class _OutputState:
    """What an existing output file already settles, per id (see the module docstring)."""

    succeeded: set[str] = field(default_factory=set)
    last_error: dict[str, dict] = field(default_factory=dict)

    def settled(self, id_: str) -> bool:
        return id_ in self.succeeded or (id_ in self.last_error and not is_transient(self.last_error[id_]))

    def failed_transiently(self, id_: str) -> bool:
        return id_ not in self.succeeded and id_ in self.last_error and is_transient(self.last_error[id_])


class BatchJob:
    """The requests of an input file that the output file does not have a final result for yet."""

    def __init__(self, items: list[BatchItem], output: Path, skipped: int, *, retried: int = 0,
                 duplicates: tuple[str, ...] = ()) -> None:
        self.items = items
        self.output = output
        self.skipped = skipped
        self.retried = retried
        self.duplicates = duplicates

    @classmethod
    def open(cls, input_path: Path, output_path: Path) -> BatchJob:
        """Parse ``input_path`` and drop the ids ``output_path`` already settles.

        Raises:
            OSError: the input cannot be read.
        """
        state = _read_output(output_path)
        items: list[BatchItem] = []
        first_line: dict[str, int] = {}
        duplicates: list[str] = []
        skipped = retried = 0
        for n, line in enumerate(input_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            item = _parse_line(line, n)
            if item.id in first_line:
                duplicates.append(f"line {n}: id {item.id!r} (first on line {first_line[item.id]})")
                continue
            first_line[item.id] = n
            if state.settled(item.id):
                skipped += 1
                continue
            retried += state.failed_transiently(item.id)
            items.append(item)
        return cls(items, output_path, skipped, retried=retried, duplicates=tuple(duplicates))

    async def run(self, frontend: Frontend, *, concurrency: int = 16,
                  admission_wait_s: float = ADMISSION_WAIT_S) -> BatchSummary:
        """Run the items with at most ``concurrency`` in flight, appending each result as it finishes;
        a progress bar goes to stderr when it is a terminal. A request whose admission was refused
        for ``admission_wait_s`` gets a transient RESOURCE_EXHAUSTED line."""
        for dup in self.duplicates:
            print(f"dsaserve batch: duplicate id, not run: {dup}", file=sys.stderr)
        pending = iter(self.items)
        failed = 0
        self.output.parent.mkdir(parents=True, exist_ok=True)
        torn = self.output.is_file() and self.output.stat().st_size > 0 and not self.output.read_bytes().endswith(b"\n")
        with (
            self.output.open("a", encoding="utf-8") as out,
            tqdm(
                total=len(self.items), file=sys.stderr, unit="req", desc="batch", disable=None, mininterval=0.5
            ) as bar,
        ):
            if torn:  # a line cut by a crash: start ours on a fresh line
                out.write("\n")

            async def worker() -> None:
                nonlocal failed
                for item in pending:  # one shared iterator: each item goes to exactly one worker
                    result = await _run_item(frontend, item, admission_wait_s)
                    failed += "error" in result
                    out.write(json.dumps(result, ensure_ascii=False) + "\n")
                    out.flush()
                    bar.update(1)

            await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(self.items))))))
        return BatchSummary(done=len(self.items), failed=failed, skipped=self.skipped, retried=self.retried,
                            duplicates=self.duplicates)


def is_transient(error: dict) -> bool:
    """Whether a result line's ``error`` object is worth retrying (see the module docstring)."""
    flag = error.get("transient")
    return flag if isinstance(flag, bool) else error.get("code") in TRANSIENT_CODES


async def _run_item(frontend: Frontend, item: BatchItem, admission_wait_s: float) -> dict[str, Any]:
    """The result line of one item; a full queue is waited out up to ``admission_wait_s`` (a batch
    trades latency for throughput)."""
    if item.request is None:
        return _error_line(item.id, "INVALID_ARGUMENT", item.error.field if item.error else None, str(item.error))
    give_up = time.monotonic() + admission_wait_s
    while True:
        try:
            completion = await frontend.complete(item.request)
        except AdmissionError as e:
            left = give_up - time.monotonic()
            if left <= 0:
                return _error_line(item.id, "RESOURCE_EXHAUSTED", None, str(e))
            await asyncio.sleep(min(max(e.retry_after_s, 0.01), MAX_RETRY_WAIT_S, left))
            continue
        except RequestError as e:
            return _error_line(item.id, "INVALID_ARGUMENT", e.field, str(e))
        except BackendUnavailable as e:
            return _error_line(item.id, "UNAVAILABLE", None, str(e))
        except TimeoutError as e:
            return _error_line(item.id, "DEADLINE_EXCEEDED", None, str(e) or "the request timed out")
        except Exception as e:  # noqa: BLE001 — one failed request must not stop the job
            return _error_line(item.id, "INTERNAL", None, f"{type(e).__name__}: {e}")
        line = {"id": item.id, **completion.to_json()}
        del line["request_id"]
        if completion.finish_reason == "error":
            line["error"] = _error("INTERNAL", None, completion.error or "the engine failed")
        elif completion.finish_reason == "abort":  # the backend ended the stream without finishing it
            line["error"] = _error("ABORTED", None, "the request ended before it finished")
        return line


def _error(code: str, field_: str | None, message: str) -> dict[str, Any]:
    return {"code": code, "field": field_, "message": message, "transient": code in TRANSIENT_CODES}


def _error_line(id_: str, code: str, field_: str | None, message: str) -> dict[str, Any]:
    return {"id": id_, "error": _error(code, field_, message)}


def _parse_line(line: str, n: int) -> BatchItem:
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        return BatchItem(f"line-{n}", None, RequestError("line", f"line {n} is not JSON: {e.msg}"))
    if not isinstance(d, dict):
        return BatchItem(f"line-{n}", None, RequestError("line", f"line {n} is not a JSON object"))
    rid = d.get("id", d.get("request_id"))
    id_ = f"line-{n}" if rid is None else str(rid)
    try:
        request = CompletionRequest.from_json(d)
    except RequestError as e:
        return BatchItem(id_, None, e)
    return BatchItem(id_, dataclasses.replace(request, request_id=id_))


def _read_output(output: Path) -> _OutputState:
    """Successes and last errors per id in the output (unreadable lines, such as a torn last line, are
    ignored)."""
    state = _OutputState()
    if not output.is_file():
        return state
    for line in output.read_text(encoding="utf-8").splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(d, dict) or "id" not in d:
            continue
        id_, error = str(d["id"]), d.get("error")
        if error is None:
            state.succeeded.add(id_)
        else:
            state.last_error[id_] = error if isinstance(error, dict) else {"code": "INTERNAL", "message": str(error)}
    return state
