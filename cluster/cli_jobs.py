"""``dsaserve batch --address HOST:PORT``: submit a JSONL file as a durable job on a server and follow it.

The input is the offline batch format (``router.batch``: request objects with an ``id``); results are
appended to the output as the offline command writes them, plus ``job_offset`` (the result's place in
the job's commit order). The job's id is kept beside the output (``OUTPUT.job``): running the same
command again follows the same job from the last offset written instead of submitting it again, and a
server restart mid-job is waited out (the stream resumes from its offset; nothing is lost or repeated).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from tqdm import tqdm

from cluster.cli_tls import client_tls
from router.client import Client, DsaServeError

RECONNECT_S = 1.0


def cmd_batch_remote(args: argparse.Namespace) -> int:
    sidecar = args.output.with_name(args.output.name + ".job")
    done_offsets = _written_offsets(args.output)
    with Client(args.address, timeout=60, **client_tls(args)) as client:
        job_id = sidecar.read_text().strip() if sidecar.is_file() else ""
        if job_id:
            job = client.jobs.get(job_id)
            print(f"dsaserve: following job {job_id} ({len(done_offsets)} results already in {args.output})",
                  file=sys.stderr)
        else:
            requests = _read_requests(args.input)
            job = client.jobs.create(requests, metadata={"input": args.input.name[:512]})
            sidecar.write_text(job.id + "\n")
            print(f"dsaserve: submitted job {job.id} ({job.total} requests)", file=sys.stderr)
        offset = max(done_offsets, default=-1) + 1
        offset = _follow(client, job.id, job.total, offset, args)
        job = client.jobs.get(job.id)
    print(f"dsaserve: job {job.id} {job.status}: {job.completed} done, {job.failed} failed, of {job.total}",
          file=sys.stderr)
    return 0 if job.status == "completed" else 1


def _follow(client: Client, job_id: str, total: int, offset: int, args: argparse.Namespace) -> int:
    """Append results from ``offset`` until the job ends; reconnect across server restarts for up to
    ``args.wait`` seconds. Returns the next offset."""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    give_up = time.monotonic() + args.wait
    with args.output.open("a", encoding="utf-8") as out, tqdm(total=total, initial=offset, file=sys.stderr,
                                                               unit="req", desc="job", disable=None) as bar:
        while True:
            try:
                for r in client.jobs.results(job_id, offset):
                    out.write(json.dumps(_line(r), ensure_ascii=False) + "\n")
                    out.flush()
                    offset = r.offset + 1
                    bar.update(1)
                    give_up = time.monotonic() + args.wait
                return offset
            except DsaServeError as e:
                if e.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or \
                        time.monotonic() > give_up:
                    raise
                time.sleep(RECONNECT_S)


def _line(r: Any) -> dict[str, Any]:
    if r.completion is not None:
        line = {"id": r.custom_id, **r.completion.to_json()}
        del line["request_id"]
    else:
        line = {"id": r.custom_id, "error": {"code": r.error.code.name, "field": r.error.field,
                                             "message": r.error.message, "transient": False}}
    line["job_offset"] = r.offset
    return line


def _read_requests(path: Path) -> list[dict[str, Any]]:
    """The input's request objects; a line that is not a JSON object is sent as an empty request under
    its ``line-N`` id, so that the server reports it in its result (as the offline command does)."""
    out = []
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            d = json.loads(text)
        except json.JSONDecodeError:
            d = None
        if not isinstance(d, dict):
            d = {"id": f"line-{n}", "prompt_ids": []}
        d.setdefault("id", f"line-{n}")
        out.append(d)
    return out


def _written_offsets(output: Path) -> list[int]:
    if not output.is_file():
        return []
    found = []
    for text in output.read_text(encoding="utf-8").splitlines():
        try:
            d = json.loads(text)
        except json.JSONDecodeError:
            continue  # a torn last line: its result is streamed again
        if isinstance(d, dict) and isinstance(d.get("job_offset"), int):
            found.append(d["job_offset"])
    return found
