"""The job runner: feeds active jobs' pending lines to the Frontend, commits each result once, writes
the output files at the end, and deletes jobs past their retention.

One runner per router process. A job is run by the runner holding its lease (``JobStore.claim``,
renewed every ``lease_s / 3``): when a router dies its lease lapses and another router, or the same
one restarted, takes the job over and runs the lines that have no result yet. A line that was in
flight when its router died runs again; a result is committed once (the store's rule), so nothing is
counted twice and nothing finished is recomputed.

Good citizenship: lines run at ``JobLimits.priority`` (interactive requests have 0; the engine
scheduler ages priorities, so a line is never starved), and a full admission queue is waited out line
by line (``lines.Retry``), so a job larger than the queue is fed in as room frees up. Priority orders
admission only: an engine step runs every admitted sequence together, and its time grows with their
number, so interactive requests would still wait behind a full batch of job lines. Hence the window:
at most ``JobLimits.concurrency`` lines of all jobs are in flight while no interactive request is (one
of a priority ahead of the jobs', as the backend counts them), and ``JobLimits.concurrency_busy`` from when one
is until ``BUSY_HOLD_S`` after the last one, so that jobs fill the capacity interactive traffic leaves.
``concurrency_busy`` 0 (the default) pauses jobs while busy, except one line every ``BUSY_TRICKLE_S``
so that no job stops: on a small machine even one job line beside an interactive request slows its
first token by half (docs/benchmarks.md, batch jobs).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from router.frontend import Frontend
from router.jobs.lines import Retry, output_line, run_line
from router.jobs.store import JobStore
from router.jobs.types import ACTIVE, FileObject, Job, JobLimits, JobLine, now

log = logging.getLogger(__name__)

POLL_S = 0.5
EXPIRE_EVERY_S = 5.0
LEASE_S = 30.0
CHUNK = 256  # lines read from the store at once
BUSY_HOLD_S = 1.0
BUSY_TRICKLE_S = 1.0
WINDOW_POLL_S = 0.02


def ahead_in_flight(backend: object, priority: int) -> int | None:
    """Requests in flight at a backend with a priority ahead of ``priority`` (a ``Dispatcher``'s
    counts, or a ``LocalBackend``'s dispatcher's; None: the backend does not tell, and the window stays
    at ``JobLimits.concurrency``)."""
    dispatcher = getattr(backend, "dispatcher", backend)
    counts = getattr(dispatcher, "in_flight_by_priority", None)
    if counts is None:
        return None
    return sum(n for p, n in list(counts.items()) if p < priority)


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    """Until ``event`` is set or ``timeout_s`` passed. (Not ``asyncio.wait_for``: on 3.11 it can lose a
    cancellation that races the event, and ``close`` then waits forever.)"""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        pass


def output_file_ids(job_id: str) -> tuple[str, str]:
    """Fixed ids of a job's output and error files: writing them again (a router died while
    finalizing) replaces them instead of leaving orphans."""
    return f"file-{job_id}-output", f"file-{job_id}-errors"


class JobRunner:
    def __init__(self, store: JobStore, frontend: Frontend, limits: JobLimits, *, model_id: str,
                 owner: str | None = None, lease_s: float = LEASE_S, poll_s: float = POLL_S) -> None:
        self.store = store
        self.frontend = frontend
        self.limits = limits
        self.model_id = model_id
        self.owner = owner or uuid.uuid4().hex
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.wake = asyncio.Event()
        self._running = 0  # lines in flight, all jobs
        self._freed = asyncio.Event()
        self._busy_until = 0.0
        self._last_start = 0.0
        self._jobs: dict[str, asyncio.Task] = {}
        self._loop_task: asyncio.Task | None = None
        self._next_expiry = 0.0

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="job-runner")

    async def close(self) -> None:
        """Stop running; unfinished lines stay pending for the next runner (this one's leases are
        released, so another router need not wait for them to lapse)."""
        tasks = [t for t in (self._loop_task, *self._jobs.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for job_id in list(self._jobs):
            await asyncio.to_thread(self.store.release, job_id, self.owner)
        self._jobs.clear()

    async def _loop(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 — a store outage must not end the runner
                log.exception("job runner: tick failed; retrying")
            await _wait(self.wake, self.poll_s)
            self.wake.clear()

    async def _tick(self) -> None:
        if time.monotonic() >= self._next_expiry:
            self._next_expiry = time.monotonic() + EXPIRE_EVERY_S
            await self._expire()
        for job_id in await asyncio.to_thread(self.store.active_jobs):
            if job_id in self._jobs:
                continue
            if await asyncio.to_thread(self.store.claim, job_id, self.owner, self.lease_s):
                task = asyncio.create_task(self._drive(job_id), name=f"job-{job_id}")
                self._jobs[job_id] = task
                task.add_done_callback(lambda _t, j=job_id: self._jobs.pop(j, None))

    async def _expire(self) -> None:
        for job_id in await asyncio.to_thread(self.store.expired, time.time()):
            for file_id in output_file_ids(job_id):
                await asyncio.to_thread(self.store.delete_file, file_id)
            await asyncio.to_thread(self.store.delete_job, job_id)
            log.info("job %s expired and was deleted", job_id)

    async def _drive(self, job_id: str) -> None:
        keeper = asyncio.create_task(self._keep_lease(job_id))
        try:
            job = await asyncio.to_thread(self.store.get_job, job_id)
            if job is None:
                return
            if job.status == "validating":
                job = await asyncio.to_thread(self.store.transition, job_id, ("validating",), "in_progress",
                                              in_progress_at=now()) or job
            if job.status == "in_progress":
                await self._run_lines(job)
            await self._finish(job_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 — released below; the next tick takes the job again
            log.exception("job %s: runner failed; it will be retried", job_id)
            await asyncio.sleep(1.0)
        finally:
            keeper.cancel()
            await asyncio.to_thread(self.store.release, job_id, self.owner)

    async def _keep_lease(self, job_id: str) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await asyncio.to_thread(self.store.claim, job_id, self.owner, self.lease_s)
            except Exception:  # noqa: BLE001 — retried at the next renewal
                log.warning("job %s: lease renewal failed", job_id)

    async def _cancelled(self, job_id: str) -> bool:
        job = await asyncio.to_thread(self.store.get_job, job_id)
        return job is None or job.status != "in_progress"

    async def _run_lines(self, job: Job) -> None:
        pending = await asyncio.to_thread(self.store.pending, job.id)
        running: set[asyncio.Task] = set()
        last_check = time.monotonic()
        try:
            for start in range(0, len(pending), CHUNK):
                lines = await asyncio.to_thread(self.store.lines, job.id, pending[start:start + CHUNK])
                for line in lines:
                    await self._room()
                    if time.monotonic() - last_check > self.poll_s:
                        last_check = time.monotonic()
                        if await self._cancelled(job.id):
                            return
                    self._running += 1
                    self._last_start = time.monotonic()
                    task = asyncio.create_task(self._run_one(job, line))
                    running.add(task)
                    task.add_done_callback(running.discard)
        finally:
            if running:  # a cancel keeps the lines already in flight: they finish and count
                await asyncio.gather(*running, return_exceptions=True)

    def window(self) -> int:
        """How many lines may be in flight now (see the module docstring)."""
        ahead = ahead_in_flight(self.frontend.backend, self.limits.priority)
        if ahead:
            self._busy_until = time.monotonic() + BUSY_HOLD_S
        if time.monotonic() >= self._busy_until:
            return self.limits.concurrency
        if self.limits.concurrency_busy:
            return self.limits.concurrency_busy
        # Paused while busy, but one line per BUSY_TRICKLE_S keeps every job moving.
        return 1 if time.monotonic() - self._last_start >= BUSY_TRICKLE_S else 0

    async def _room(self) -> None:
        while self._running >= self.window():
            self._freed.clear()
            await _wait(self._freed, WINDOW_POLL_S)

    async def _run_one(self, job: Job, line: JobLine) -> None:
        """Run a line until it has a result, and commit it. Its place in the window is given back once
        the engines are done with it, before the commit: the window bounds engine work."""
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._running -= 1
                self._freed.set()

        try:
            while True:
                try:
                    result = await run_line(self.frontend, job, line, model_id=self.model_id,
                                            priority=self.limits.priority)
                except Retry as r:
                    if await self._cancelled(job.id):
                        return
                    await asyncio.sleep(min(r.wait_s, 1.0))
                    continue
                release()
                await asyncio.to_thread(self.store.commit, job.id, result)
                return
        finally:
            release()

    async def _finish(self, job_id: str) -> None:
        """Write the output files and end the job (completed, or cancelled after a cancel)."""
        job = await asyncio.to_thread(self.store.get_job, job_id)
        if job is None or job.status not in ACTIVE:
            return
        if job.status == "in_progress":
            if await asyncio.to_thread(self.store.pending, job_id):
                return  # cancelled between checks; the next tick sees "cancelling"
            job = await asyncio.to_thread(self.store.transition, job_id, ("in_progress",), "finalizing",
                                          finalizing_at=now())
            if job is None:
                return
        files = await self._write_outputs(job)
        end = "cancelled" if job.status == "cancelling" else "completed"
        await asyncio.to_thread(self.store.transition, job_id, (job.status,), end, **files,
                                **{f"{end}_at": now()}, retain_until=time.time() + self.limits.retention_s)

    async def _write_outputs(self, job: Job) -> dict[str, str | None]:
        results = []
        offset = 0
        while batch := await asyncio.to_thread(self.store.results, job.id, offset, 5000):
            results += batch
            offset += len(batch)
        results.sort(key=lambda r: r.index)
        lines = {line.index: line for line in
                 await asyncio.to_thread(self.store.lines, job.id, [r.index for r in results])}
        out, err = [], []
        for r in results:
            body, failed = output_line(lines[r.index], r, model_id=self.model_id, frontend=self.frontend,
                                       created=job.created_at)
            (err if failed else out).append(json.dumps(body, ensure_ascii=False))
        ids = {}
        for (key, rows), file_id in zip((("output_file_id", out), ("error_file_id", err)), output_file_ids(job.id)):
            ids[key] = None
            if rows:
                data = ("\n".join(rows) + "\n").encode()
                await asyncio.to_thread(self.store.delete_file, file_id)
                await asyncio.to_thread(self.store.put_file, FileObject(file_id, len(data), f"{job.id}_{key[:-8]}.jsonl",
                                                                        "batch_output", tenant=job.tenant), data)
                ids[key] = file_id
        return ids
