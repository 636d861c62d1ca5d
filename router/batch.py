"""Offline batch jobs over JSONL files (``dsaserve batch``): resumable, one result line per request.

Input lines are JSON objects as ``CompletionRequest.from_json`` reads them, with an ``id`` (a line
without one is ``line-N``, N counting from 1). Each result is appended and flushed as it finishes:
``{"id", "token_ids", "text", "finish_reason", "usage", "ttft_ms"}``, or ``{"id", "error": {"code",
"field", "message"}}`` for a line that could not run. A rerun skips the ids already in the output, so
an interrupted job continues where it stopped; a torn last line is ignored (its id runs again).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from router.backend import AdmissionError, BackendUnavailable
from router.frontend import CompletionRequest, Frontend
from workers.engine.types import RequestError

MAX_RETRY_WAIT_S = 1.0


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
    skipped: int  # input ids already in the output


class BatchJob:
    """The requests of an input file that the output file does not have yet."""

    def __init__(self, items: list[BatchItem], output: Path, skipped: int) -> None:
        self.items = items
        self.output = output
        self.skipped = skipped

    @classmethod
    def open(cls, input_path: Path, output_path: Path) -> BatchJob:
        """Parse ``input_path`` and drop the ids already in ``output_path``.

        Raises:
            OSError: the input cannot be read.
        """
        done = _done_ids(output_path)
        items: list[BatchItem] = []
        seen: set[str] = set()
        skipped = 0
        for n, line in enumerate(input_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            item = _parse_line(line, n)
            if item.id in done:
                skipped += 1
                continue
            if item.id in seen:
                item = BatchItem(item.id, None, RequestError("id", f"duplicate id {item.id!r} (line {n})"))
            seen.add(item.id)
            items.append(item)
        return cls(items, output_path, skipped)

    async def run(self, frontend: Frontend, *, concurrency: int = 16) -> BatchSummary:
        """Run the items with at most ``concurrency`` in flight, appending each result as it finishes;
        a progress bar goes to stderr when it is a terminal."""
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
                    result = await _run_item(frontend, item)
                    failed += "error" in result
                    out.write(json.dumps(result, ensure_ascii=False) + "\n")
                    out.flush()
                    bar.update(1)

            await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(self.items))))))
        return BatchSummary(done=len(self.items), failed=failed, skipped=self.skipped)


async def _run_item(frontend: Frontend, item: BatchItem) -> dict[str, Any]:
    """The result line of one item; a full queue is waited out (a batch trades latency for throughput)."""
    if item.request is None:
        return _error_line(item.id, "INVALID_ARGUMENT", item.error.field if item.error else None, str(item.error))
    while True:
        try:
            completion = await frontend.complete(item.request)
        except AdmissionError as e:
            await asyncio.sleep(min(max(e.retry_after_s, 0.01), MAX_RETRY_WAIT_S))
            continue
        except RequestError as e:
            return _error_line(item.id, "INVALID_ARGUMENT", e.field, str(e))
        except BackendUnavailable as e:
            return _error_line(item.id, "UNAVAILABLE", None, str(e))
        except Exception as e:  # noqa: BLE001 — one failed request must not stop the job
            return _error_line(item.id, "INTERNAL", None, f"{type(e).__name__}: {e}")
        line = {"id": item.id, **completion.to_json()}
        del line["request_id"]
        if completion.finish_reason == "error":
            line["error"] = {"code": "INTERNAL", "field": None, "message": completion.error or "the engine failed"}
        return line


def _error_line(id_: str, code: str, field: str | None, message: str) -> dict[str, Any]:
    return {"id": id_, "error": {"code": code, "field": field, "message": message}}


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


def _done_ids(output: Path) -> set[str]:
    """Ids already in the output file (unreadable lines, such as a torn last line, are ignored)."""
    if not output.is_file():
        return set()
    done = set()
    for line in output.read_text(encoding="utf-8").splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(d, dict) and "id" in d:
            done.add(str(d["id"]))
    return done
