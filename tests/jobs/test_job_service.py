"""``JobService`` in process on a real LocalBackend: retention expiry, the window that makes job lines
yield to interactive requests, and a second runner taking over a job whose runner died."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cluster.local import LocalBackend
from router.frontend import CompletionRequest, Frontend
from router.jobs.runner import output_file_ids
from router.jobs.service import JobError, JobService
from router.jobs.sqlite_store import SQLiteJobStore
from router.jobs.types import JobLimits
from router.proto.dsaserve.v1 import dsaserve_pb2 as pb
from workers.engine.config import EngineConfig
from workers.engine.types import SamplingParams


def requests(n: int, max_tokens: int = 4) -> list[pb.GenerateRequest]:
    return [pb.GenerateRequest(request_id=f"r{i}", prompt_ids=pb.TokenIds(ids=[3 + i % 30, 8]), max_tokens=max_tokens,
                               ignore_eos=True) for i in range(n)]


async def until(cond, timeout: float = 60.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (value := await cond()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(every)
    return value


@pytest.fixture(scope="module")
def loop():
    """One loop for the module: a LocalBackend answers on the loop that first used it."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def backend(jobs_model: Path, loop):
    with LocalBackend.start(jobs_model, engine_config=EngineConfig(num_blocks=256, block_size=16)) as b:
        yield b


def test_finished_jobs_expire_after_their_retention(backend, loop, tmp_path: Path) -> None:
    async def run() -> None:
        store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
        service = JobService(store, Frontend(backend, None), JobLimits(retention_s=0.5), poll_s=0.05)
        service.start()
        try:
            job = await service.create(endpoint="dsaserve.v1.GenerateRequest", requests=requests(6), tenant="")
            done = await until(lambda: _ended(service, job.id))
            assert done.status == "completed" and done.output_file_id == output_file_ids(job.id)[0]
            assert done.retain_until is not None
            assert len(await service.file_content(done.output_file_id, "")) > 0
            await until(lambda: _gone(service, job.id), timeout=20)
            with pytest.raises(JobError) as e:
                await service.file(done.output_file_id, "")
            assert e.value.status == 404
            assert store.results(job.id) == [] and store.pending(job.id) == []
        finally:
            await service.close()

    loop.run_until_complete(run())


def test_job_lines_yield_to_interactive_requests(backend, loop, tmp_path: Path) -> None:
    async def run() -> None:
        store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
        limits = JobLimits(concurrency=16, concurrency_busy=1)
        frontend = Frontend(backend, None)
        service = JobService(store, frontend, limits, poll_s=0.05)
        service.start()
        try:
            job = await service.create(endpoint="dsaserve.v1.GenerateRequest", requests=requests(200, 16),
                                       tenant="")
            await until(lambda: _at_least(service, job.id, 3))
            assert service.runner.window() == 16
            seen: list[int] = []

            async def watch() -> None:
                while True:
                    seen.append(service.runner._running)
                    await asyncio.sleep(0.01)

            watcher = asyncio.create_task(watch())
            interactive = CompletionRequest(prompt_ids=(5, 6, 7), params=SamplingParams(max_tokens=48, ignore_eos=True))
            out = await frontend.complete(interactive)
            watcher.cancel()
            assert len(out.token_ids) == 48
            # while it ran, lines finished and no new ones went in beyond the busy window
            assert min(seen) <= 1 and seen[-1] <= 1, seen
            assert service.runner.window() == 1  # held for a moment after the last interactive request
            await asyncio.sleep(1.2)
            assert service.runner.window() == 16
            await service.cancel(job.id, "")
        finally:
            await service.close()

    loop.run_until_complete(run())


def test_a_second_runner_takes_over_when_the_first_stops(backend, loop, tmp_path: Path) -> None:
    async def run() -> None:
        path = tmp_path / "jobs.sqlite3"
        limits = JobLimits(concurrency=2, concurrency_busy=2)
        first = JobService(SQLiteJobStore(path), Frontend(backend, None), limits, owner="a", poll_s=0.05)
        first.start()
        job = await first.create(endpoint="dsaserve.v1.GenerateRequest", requests=requests(40, 8), tenant="")
        await until(lambda: _at_least(first, job.id, 4))
        await first.close()  # releases its lease; unfinished lines stay pending
        store = SQLiteJobStore(path)
        kept = store.results(job.id, limit=100)
        second = JobService(store, Frontend(backend, None), limits, owner="b", poll_s=0.05)
        second.start()
        try:
            done = await until(lambda: _ended(second, job.id))
            assert done.status == "completed" and done.request_counts.completed == 40
            results = store.results(job.id, limit=100)
            assert results[:len(kept)] == kept and sorted(r.index for r in results) == list(range(40))
        finally:
            await second.close()

    loop.run_until_complete(run())


async def _ended(service: JobService, job_id: str):
    job = await service.get(job_id, "")
    return job if job.status in ("completed", "cancelled", "failed") else None


async def _at_least(service: JobService, job_id: str, n: int) -> bool:
    return (await service.get(job_id, "")).request_counts.completed >= n


async def _gone(service: JobService, job_id: str) -> bool:
    try:
        await service.get(job_id, "")
    except JobError:
        return True
    return False


def test_jobs_in_flight_limit_refuses_with_429(backend, loop, tmp_path: Path) -> None:
    async def run() -> None:
        service = JobService(SQLiteJobStore(tmp_path / "jobs.sqlite3"), Frontend(backend, None),
                             JobLimits(max_jobs_in_flight=1), poll_s=0.05)  # not started: jobs stay unfinished
        try:
            await service.create(endpoint="dsaserve.v1.GenerateRequest", requests=requests(2), tenant="")
            with pytest.raises(JobError) as e:
                await service.create(endpoint="dsaserve.v1.GenerateRequest", requests=requests(2), tenant="")
            assert e.value.status == 429 and "at most 1" in e.value.message
        finally:
            await service.close()

    loop.run_until_complete(run())


def test_with_api_keys_jobs_and_files_belong_to_their_key(backend, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from router.http import build_app

    service = JobService(SQLiteJobStore(tmp_path / "jobs.sqlite3"), Frontend(backend, None), JobLimits())
    app = build_app(Frontend(backend, None), api_keys=frozenset({"key-a", "key-b"}), jobs=service)
    line = b'{"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {"prompt": [1, 2]}}\n'
    with TestClient(app) as http:
        a, b = ({"Authorization": f"Bearer {k}"} for k in ("key-a", "key-b"))
        assert http.post("/v1/files", files={"file": ("in.jsonl", line)}, data={"purpose": "batch"}).status_code == 401
        file = http.post("/v1/files", headers=a, files={"file": ("in.jsonl", line)}, data={"purpose": "batch"}).json()
        assert http.get(f"/v1/files/{file['id']}/content", headers=a).content == line
        assert http.get(f"/v1/files/{file['id']}/content", headers=b).status_code == 404
        body = {"input_file_id": file["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
        assert http.post("/v1/batches", headers=b, json=body).status_code == 404  # not b's file
        batch = http.post("/v1/batches", headers=a, json=body).json()
        assert batch["status"] == "in_progress" and batch["request_counts"]["total"] == 1
        assert http.get(f"/v1/batches/{batch['id']}", headers=b).status_code == 404
        assert http.post(f"/v1/batches/{batch['id']}/cancel", headers=b).status_code == 404
        assert [x["id"] for x in http.get("/v1/batches", headers=a).json()["data"]] == [batch["id"]]
        assert http.get("/v1/batches", headers=b).json()["data"] == []
        assert [f["id"] for f in http.get("/v1/files", headers=b).json()["data"]] == []
        unknown = http.post("/v1/batches", headers=a, json={**body, "priority": 1})
        assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "priority"
    service.store.close()
