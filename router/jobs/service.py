"""Batch jobs as the APIs see them: files, jobs and results, per tenant, with the limits enforced.

Both front doors use one ``JobService``: the OpenAI Batch API (``router.http.batch_api``) and gRPC's
``dsaserve.v1.BatchJobs`` (``router.jobs.grpc_service``). It owns the process's ``JobRunner``.

Tenants: with API keys configured, a job and a file belong to the key that created them (stored as a
hash of it, never the key) and other keys see them as not found.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

from router.frontend import Frontend
from router.jobs.lines import grpc_lines, parse_input
from router.jobs.runner import JobRunner
from router.jobs.store import JobStore
from router.jobs.types import ENDPOINTS, FILE_PURPOSES, FINAL, FileObject, Job, JobLimits, LineResult, RequestCounts, new_id, now
from router.proto.dsaserve.v1 import dsaserve_pb2 as pb
from workers.engine.types import RequestError

FOLLOW_POLL_S = 0.2
COMPLETION_WINDOW_S = 24 * 3600


class JobError(Exception):
    """A refusal with its HTTP status: 400 (a field, named), 404 (no such job or file for this
    tenant), 429 (too many jobs in flight)."""

    def __init__(self, status: int, field: str | None, message: str, code: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.status, self.field, self.message, self.code = status, field, message, code


def tenant_of(key: str | None) -> str:
    """How a caller's API key is stored: a hash ("" without keys)."""
    return hashlib.sha256(key.encode()).hexdigest()[:32] if key else ""


class JobService:
    def __init__(self, store: JobStore, frontend: Frontend, limits: JobLimits | None = None, *,
                 model_id: str | None = None, owner: str | None = None, lease_s: float | None = None,
                 poll_s: float | None = None) -> None:
        self.store = store
        self.frontend = frontend
        self.limits = limits or JobLimits()
        self.model_id = model_id or frontend.info.model_id
        extra = {k: v for k, v in (("lease_s", lease_s), ("poll_s", poll_s)) if v is not None}
        self.runner = JobRunner(store, frontend, self.limits, model_id=self.model_id, owner=owner, **extra)

    def start(self) -> None:
        """Start the runner (needs a running event loop): jobs left active by a previous process
        resume now."""
        self.runner.start()

    async def close(self) -> None:
        await self.runner.close()
        await asyncio.to_thread(self.store.close)

    # Files.
    async def upload(self, data: bytes, *, filename: str, purpose: str, tenant: str) -> FileObject:
        if purpose != "batch":
            raise JobError(400, "purpose", f"only 'batch' files can be uploaded, got {purpose!r}")
        if len(data) > self.limits.max_file_bytes:
            raise JobError(413, "file", f"{len(data)} bytes; at most {self.limits.max_file_bytes}",
                           code="file_too_large")
        file = FileObject(new_id("file"), len(data), filename or "upload.jsonl", purpose, tenant=tenant)
        await asyncio.to_thread(self.store.put_file, file, data)
        return file

    async def file(self, file_id: str, tenant: str) -> FileObject:
        file = await asyncio.to_thread(self.store.get_file, file_id)
        if file is None or file.tenant != tenant:
            raise JobError(404, "file_id", f"no file {file_id!r}", code="not_found")
        return file

    async def file_content(self, file_id: str, tenant: str) -> bytes:
        await self.file(file_id, tenant)
        data = await asyncio.to_thread(self.store.file_content, file_id)
        if data is None:
            raise JobError(404, "file_id", f"no file {file_id!r}", code="not_found")
        return data

    async def list_files(self, tenant: str, purpose: str | None = None) -> list[FileObject]:
        files = await asyncio.to_thread(self.store.list_files, tenant)
        return [f for f in files if purpose is None or f.purpose == purpose]

    async def delete_file(self, file_id: str, tenant: str) -> None:
        await self.file(file_id, tenant)
        await asyncio.to_thread(self.store.delete_file, file_id)

    # Jobs.
    async def create(self, *, endpoint: str, tenant: str, input_file_id: str | None = None,
                     requests: list[pb.GenerateRequest] | None = None, metadata: dict[str, str] | None = None,
                     completion_window: str = "24h") -> Job:
        """A job from an uploaded file (``input_file_id``, lines for ``endpoint``) or from inline gRPC
        requests. Raises JobError."""
        if completion_window != "24h":
            raise JobError(400, "completion_window", f"only '24h' is supported, got {completion_window!r}")
        if metadata is not None and (len(metadata) > 16 or any(len(k) > 64 or len(str(v)) > 512
                                                               for k, v in metadata.items())):
            raise JobError(400, "metadata", "at most 16 pairs, keys of at most 64 and values of at most 512 characters")
        active = await asyncio.to_thread(self.store.active_jobs)  # before reading any input
        if len(active) >= self.limits.max_jobs_in_flight:
            raise JobError(429, None, f"{len(active)} jobs are unfinished; at most {self.limits.max_jobs_in_flight} "
                           "at once: retry when one ends", code="too_many_jobs")
        if requests is not None:
            if not requests:
                raise JobError(400, "requests", "a job needs at least one request")
            if len(requests) > self.limits.max_lines_per_job:
                raise JobError(400, "requests", f"{len(requests)} requests; at most {self.limits.max_lines_per_job} per job")
            lines = grpc_lines(requests)
        else:
            if endpoint not in ENDPOINTS:
                raise JobError(400, "endpoint", f"must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
            if not input_file_id:
                raise JobError(400, "input_file_id", "required")
            file = await self.file(input_file_id, tenant)
            if file.purpose != "batch":
                raise JobError(400, "input_file_id", f"the file's purpose is {file.purpose!r}, not 'batch'")
            data = await asyncio.to_thread(self.store.file_content, input_file_id) or b""
            try:
                lines = parse_input(data, endpoint, self.limits)
            except RequestError as e:
                raise JobError(400, e.field, str(e).removeprefix(f"{e.field}: ")) from None
        created = now()
        job = Job(id=new_id("batch"), endpoint=endpoint, input_file_id=input_file_id, status="in_progress",
                  created_at=created, in_progress_at=created, expires_at=created + COMPLETION_WINDOW_S,
                  request_counts=RequestCounts(total=len(lines)), metadata=metadata, tenant=tenant)
        await asyncio.to_thread(self.store.create_job, job, lines)
        self.runner.wake.set()
        return job

    async def get(self, job_id: str, tenant: str) -> Job:
        job = await asyncio.to_thread(self.store.get_job, job_id)
        if job is None or job.tenant != tenant:
            raise JobError(404, "batch_id", f"no batch {job_id!r}", code="not_found")
        return job

    async def list(self, tenant: str, *, after: str | None = None, limit: int = 20) -> list[Job]:
        if not 1 <= limit <= 100:
            raise JobError(400, "limit", f"must be 1..100, got {limit}")
        return await asyncio.to_thread(self.store.list_jobs, tenant, after=after, limit=limit)

    async def cancel(self, job_id: str, tenant: str) -> Job:
        """Stop feeding new lines; the finished ones stay, and the job ends ``cancelled`` with its
        output files once the lines in flight finish. Cancelling a finished job changes nothing."""
        job = await self.get(job_id, tenant)
        if job.status in FINAL or job.status == "cancelling":
            return job
        moved = await asyncio.to_thread(self.store.transition, job_id, ("validating", "in_progress"),
                                        "cancelling", cancelling_at=now())
        self.runner.wake.set()
        return moved or await self.get(job_id, tenant)

    async def follow(self, job_id: str, tenant: str, offset: int = 0) -> AsyncIterator[LineResult]:
        """Results from ``offset`` (their ``seq``) on, as they are committed, until the job has ended
        and every result was given."""
        if offset < 0:
            raise JobError(400, "offset", f"must be ≥ 0, got {offset}")
        await self.get(job_id, tenant)
        while True:
            batch = await asyncio.to_thread(self.store.results, job_id, offset, 500)
            for r in batch:
                yield r
            offset += len(batch)
            if batch:
                continue
            job = await asyncio.to_thread(self.store.get_job, job_id)
            if job is None:
                return
            if job.status in FINAL:
                if not await asyncio.to_thread(self.store.results, job_id, offset, 1):
                    return
                continue
            await asyncio.sleep(FOLLOW_POLL_S)
