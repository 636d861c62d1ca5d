"""Batch jobs on a real ``dsaserve local`` process, through the real ``openai`` client and the gRPC
client: the OpenAI Batch workflow, per-line errors and refusals, cancel, list and get while running,
and a SIGKILL mid-job after which the job completes with no line lost, repeated or recomputed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from router.client import Client
from router.jobs.sqlite_store import SQLiteJobStore

from .server import ROOT, LocalServer, completion_line, ended, jsonl, upload, wait_for

MAX_LINES = 250
MAX_FILE_BYTES = 100_000


@pytest.fixture(scope="module")
def server(jobs_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    store = tmp_path_factory.mktemp("jobs") / "jobs.sqlite3"
    s = LocalServer(jobs_model, store, "--job-limit", f"max_lines_per_job={MAX_LINES}",
                    "--job-limit", f"max_file_bytes={MAX_FILE_BYTES}").start()
    try:
        yield s
    finally:
        s.stop()


def test_openai_batch_workflow_equals_requests_sent_one_by_one(server: LocalServer) -> None:
    api = server.openai()
    lines = [completion_line(i) for i in range(200)]
    file_id = upload(api, lines)
    batch = api.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h",
                               metadata={"run": "workflow"})
    assert batch.status == "in_progress" and batch.request_counts.total == 200
    done = wait_for(api, batch.id, ended)
    assert done.status == "completed" and done.metadata == {"run": "workflow"}
    assert (done.request_counts.completed, done.request_counts.failed) == (200, 0)
    assert done.error_file_id is None and done.completed_at >= done.created_at
    out = jsonl(api.files.content(done.output_file_id).text)
    assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(200))  # each exactly once
    by_id = {o["custom_id"]: o for o in out}
    for i in range(0, 200, 5):  # a sample, one by one, must give the same tokens
        body = lines[i]["body"]
        one = api.completions.create(**body)
        got = by_id[f"req-{i}"]["response"]
        assert got["status_code"] == 200
        assert got["body"]["choices"][0]["text"] == one.choices[0].text
        assert got["body"]["usage"]["completion_tokens"] == one.usage.completion_tokens == 4


def test_chat_batch(server: LocalServer) -> None:
    api = server.openai()
    lines = [{"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": f"Say {i}"}], "max_tokens": 3, "temperature": 0}}
             for i in range(4)]
    batch = api.batches.create(input_file_id=upload(api, lines), endpoint="/v1/chat/completions",
                               completion_window="24h")
    done = wait_for(api, batch.id, ended)
    out = {o["custom_id"]: o for o in jsonl(api.files.content(done.output_file_id).text)}
    for i, line in enumerate(lines):
        one = api.chat.completions.create(**line["body"], model="tiny")
        body = out[f"chat-{i}"]["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == one.choices[0].message.content


def test_bad_lines_fail_alone_and_the_rest_runs(server: LocalServer) -> None:
    api = server.openai()
    lines = [completion_line(0), "not json", {"method": "POST", "url": "/v1/completions", "body": {}},
             completion_line(0), {**completion_line(3), "url": "/v1/embeddings"},
             {**completion_line(4), "body": {"prompt": "x", "temprature": 1}},
             {**completion_line(5), "body": {"model": "gpt-9", "prompt": "x"}},
             {**completion_line(6), "body": {"prompt": [1, 2], "max_tokens": 10**9}}, completion_line(7)]
    batch = api.batches.create(input_file_id=upload(api, lines), endpoint="/v1/completions", completion_window="24h")
    done = wait_for(api, batch.id, ended)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 7)
    good = jsonl(api.files.content(done.output_file_id).text)
    assert sorted(o["custom_id"] for o in good) == ["req-0", "req-7"]
    errors = {o["id"]: o for o in jsonl(api.files.content(done.error_file_id).text)}
    assert "not JSON" in errors["batch_req_1"]["error"]["message"] and errors["batch_req_1"]["response"] is None
    assert "custom_id" in errors["batch_req_2"]["error"]["message"]
    assert errors["batch_req_3"]["error"]["code"] == "duplicate_custom_id"
    assert "/v1/embeddings" in errors["batch_req_4"]["error"]["message"]
    for index, status, param in ((5, 400, "temprature"), (6, 404, "model"), (7, 400, "max_tokens")):
        response = errors[f"batch_req_{index}"]["response"]
        assert response["status_code"] == status and response["body"]["error"]["param"] == param, response


def test_refusals_name_the_field_and_the_limit(server: LocalServer) -> None:
    api = server.openai()
    with pytest.raises(openai.APIStatusError) as e:
        api.files.create(file=("big.jsonl", b"x" * (MAX_FILE_BYTES + 1)), purpose="batch")
    assert e.value.status_code == 413 and str(MAX_FILE_BYTES) in e.value.message
    too_many = upload(api, [completion_line(i) for i in range(MAX_LINES + 1)])
    with pytest.raises(openai.BadRequestError) as e:
        api.batches.create(input_file_id=too_many, endpoint="/v1/completions", completion_window="24h")
    assert e.value.body["param"] == "input_file_id" and str(MAX_LINES) in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        api.batches.create(input_file_id=too_many, endpoint="/v1/embeddings", completion_window="24h")
    assert e.value.body["param"] == "endpoint"
    with pytest.raises(openai.NotFoundError):
        api.batches.create(input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError) as e:
        api.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    assert e.value.body["param"] == "purpose"
    with pytest.raises(openai.NotFoundError):
        api.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        api.batches.cancel("batch_nope")


def test_cancel_keeps_finished_lines_and_list_and_get_while_running(server: LocalServer) -> None:
    api = server.openai()
    lines = [completion_line(i, max_tokens=48, ignore_eos=True) for i in range(240)]
    batch = api.batches.create(input_file_id=upload(api, lines), endpoint="/v1/completions", completion_window="24h")
    running = wait_for(api, batch.id, lambda b: b.request_counts.completed >= 5)
    assert running.status == "in_progress" and running.request_counts.completed < 240
    assert batch.id in [b.id for b in api.batches.list(limit=100).data]
    cancelled = api.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    done = wait_for(api, batch.id, ended)
    assert done.status == "cancelled" and done.cancelled_at is not None
    n = done.request_counts.completed
    assert 5 <= n < 240 and done.request_counts.failed == 0
    out = jsonl(api.files.content(done.output_file_id).text)
    assert len(out) == n and len({o["custom_id"] for o in out}) == n
    time.sleep(1.0)
    assert api.batches.retrieve(batch.id).request_counts.completed == n  # nothing runs after the end
    assert api.batches.cancel(batch.id).status == "cancelled"  # cancelling an ended job changes nothing


def test_sigkill_mid_job_loses_and_repeats_nothing(jobs_model: Path, tmp_path: Path) -> None:
    store_path = tmp_path / "jobs.sqlite3"
    server = LocalServer(jobs_model, store_path, "--job-limit", "concurrency=4").start()
    try:
        api = server.openai()
        lines = [completion_line(i, max_tokens=16, ignore_eos=True) for i in range(80)]
        batch = api.batches.create(input_file_id=upload(api, lines), endpoint="/v1/completions",
                                   completion_window="24h")
        wait_for(api, batch.id, lambda b: b.request_counts.completed >= 12)
        server.kill()
        store = SQLiteJobStore(store_path)
        before = store.results(batch.id, limit=1000)
        store.close()
        assert 12 <= len(before) < 80
        server.start()
        done = wait_for(server.openai(), batch.id, ended)
        assert done.status == "completed" and done.request_counts.completed == 80
        store = SQLiteJobStore(store_path)
        after = store.results(batch.id, limit=1000)
        store.close()
        assert sorted(r.index for r in after) == list(range(80)) and [r.seq for r in after] == list(range(80))
        assert after[:len(before)] == before  # the finished lines kept their results
        with Client(server.address, timeout=30) as c:  # and were not run again
            assert c.status()["router"]["requests_total"] == 80 - len(before)
        out = jsonl(server.openai().files.content(done.output_file_id).text)
        assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(80))
    finally:
        server.stop()


def test_grpc_job_cli_follows_across_a_sigkill(jobs_model: Path, tmp_path: Path) -> None:
    server = LocalServer(jobs_model, tmp_path / "jobs.sqlite3", "--job-limit", "concurrency=4").start()
    requests = [{"id": f"g{i}", "prompt_ids": [5 + i % 40, 9], "max_tokens": 16, "ignore_eos": True}
                for i in range(64)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    output = tmp_path / "out.jsonl"
    cli = subprocess.Popen([sys.executable, "-m", "cluster.cli", "batch", "--address", server.address,
                            "--input", str(tmp_path / "in.jsonl"), "--output", str(output), "--wait", "120"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (output.is_file() and len(output.read_text().splitlines()) >= 10):
            assert time.monotonic() < deadline and cli.poll() is None, cli.stderr.read() if cli.poll() else "slow"
            time.sleep(0.05)
        server.kill()
        time.sleep(1.0)  # the CLI sees the server gone and keeps retrying
        server.start()
        assert cli.wait(180) == 0, cli.stderr.read()
        out = jsonl(output.read_text())
        assert sorted(o["id"] for o in out) == sorted(r["id"] for r in requests)  # none lost, none twice
        assert [o["job_offset"] for o in out] == list(range(64))
        assert all(len(o["token_ids"]) == 16 for o in out)
        job_id = (tmp_path / "out.jsonl.job").read_text().strip()
        with Client(server.address, timeout=30) as c:
            job = c.jobs.get(job_id)
            assert (job.status, job.completed, job.total) == ("completed", 64, 64)
            again = list(c.jobs.results(job_id, offset=62))  # resuming from an offset
            assert [r.offset for r in again] == [62, 63]
            assert [r.completion.token_ids for r in again] == [tuple(o["token_ids"]) for o in out[62:]]
            jobs, _ = c.jobs.list(limit=5)
            assert jobs[0].id == job_id
    finally:
        if cli.poll() is None:
            cli.kill()
        server.stop()
