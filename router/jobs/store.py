"""Where batch jobs live: the ``JobStore`` protocol, and opening a store from a URL.

Two implementations keep the same contract: ``SQLiteJobStore`` (local mode: one file under the cache
folder) and ``RedisJobStore`` (cluster mode: every router replica sees every job). The contract tests
in ``tests/router/test_job_store.py`` run against both.

Contract, for every method (all are synchronous and thread-safe; the service calls them off the event
loop):

- **Durable**: whatever a call wrote is there after the process is killed (SIGKILL) right after it
  returns.
- **Exactly once**: ``commit`` stores a line's result only if the line has none; the first commit wins,
  moves the job's counts (``completed``, or ``failed`` for an error result) and gets the next ``seq``
  (0, 1, 2, ... per job, in commit order, without gaps). A later commit of the same line changes
  nothing and returns False.
- **Atomic status**: ``transition`` changes a job's status only from one of ``allowed_from``; two
  callers racing (a cancel and the runner's finalization) cannot both win.
- **Leases**: ``claim`` gives one owner at a time the right to run a job, for ``ttl_s`` unless renewed
  by claiming again; a dead owner's lease lapses, and another owner (or the same one restarted) may
  claim it. ``SQLiteJobStore`` serves one process, so its leases are only in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from router.jobs.types import FileObject, Job, JobLine, LineResult


class JobStore(Protocol):
    # Files (inputs uploaded by clients, outputs written at a job's end).
    def put_file(self, file: FileObject, data: bytes) -> None: ...

    def get_file(self, file_id: str) -> FileObject | None: ...

    def file_content(self, file_id: str) -> bytes | None: ...

    def list_files(self, tenant: str | None) -> list[FileObject]:
        """Newest first; ``tenant`` None: everyone's."""
        ...

    def delete_file(self, file_id: str) -> bool: ...

    # Jobs.
    def create_job(self, job: Job, lines: Sequence[JobLine]) -> None:
        """Store ``job`` with its input ``lines`` (indexes 0..n-1), at once: a crash leaves both or
        neither. ``job.request_counts.total`` must be ``len(lines)``."""
        ...

    def get_job(self, job_id: str) -> Job | None: ...

    def list_jobs(self, tenant: str | None, *, after: str | None = None, limit: int = 20) -> list[Job]:
        """Newest first (by ``created_at``, then id), starting after the job ``after``."""
        ...

    def transition(self, job_id: str, allowed_from: Sequence[str], status: str, **fields: Any) -> Job | None:
        """Set the status (and the given Job fields) if the status is one of ``allowed_from``; the job
        as it is now, or None when it does not exist or was not in ``allowed_from``."""
        ...

    def active_jobs(self) -> list[str]:
        """Ids of the jobs in an active status (``types.ACTIVE``), oldest first."""
        ...

    def expired(self, at: float) -> list[str]:
        """Ids of finished jobs whose ``retain_until`` is at or before ``at``."""
        ...

    def delete_job(self, job_id: str) -> None:
        """Remove the job, its lines and its results (not its files)."""
        ...

    # Lines and results.
    def lines(self, job_id: str, indexes: Sequence[int]) -> list[JobLine]: ...

    def pending(self, job_id: str) -> list[int]:
        """Indexes of the lines without a result, ascending."""
        ...

    def commit(self, job_id: str, result: LineResult) -> bool:
        """Store ``result`` for its line unless the line has one (see the contract above)."""
        ...

    def results(self, job_id: str, offset: int = 0, limit: int = 1000) -> list[LineResult]:
        """Results with ``offset <= seq < offset + limit``, by seq (each with its ``seq`` set)."""
        ...

    # Leases (which router runs a job).
    def claim(self, job_id: str, owner: str, ttl_s: float) -> bool: ...

    def release(self, job_id: str, owner: str) -> None: ...

    def close(self) -> None: ...


def open_store(url: str, *, redis_options: dict[str, Any] | None = None) -> JobStore:
    """``sqlite:///PATH`` (or a plain path) or ``redis://...``/``rediss://...``."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        from router.jobs.redis_store import RedisJobStore

        return RedisJobStore.from_url(url, **(redis_options or {}))
    from router.jobs.sqlite_store import SQLiteJobStore

    return SQLiteJobStore(Path(url.removeprefix("sqlite://")))
