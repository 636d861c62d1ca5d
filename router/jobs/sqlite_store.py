"""``JobStore`` in one SQLite file (local mode). WAL journal: a commit is on disk before the call
returns, so a killed process loses nothing it acknowledged."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from router.jobs.types import ACTIVE, FINAL, FileObject, Job, JobLine, LineResult

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, tenant TEXT, filename TEXT, purpose TEXT,
    bytes INTEGER, created_at INTEGER, data BLOB);
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, tenant TEXT, created_at INTEGER, status TEXT,
    retain_until REAL, record TEXT);
CREATE TABLE IF NOT EXISTS lines (job_id TEXT, idx INTEGER, record TEXT, PRIMARY KEY (job_id, idx));
CREATE TABLE IF NOT EXISTS results (job_id TEXT, idx INTEGER, seq INTEGER, failed INTEGER, record TEXT,
    PRIMARY KEY (job_id, idx));
CREATE UNIQUE INDEX IF NOT EXISTS results_seq ON results (job_id, seq);
"""


class SQLiteJobStore:
    """See ``router.jobs.store`` for the contract."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across a killed process (not a lost disk)
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._leases: dict[str, tuple[str, float]] = {}

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # Files.
    def put_file(self, file: FileObject, data: bytes) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (file.id, file.tenant, file.filename, file.purpose, file.bytes, file.created_at, data))

    def get_file(self, file_id: str) -> FileObject | None:
        rows = self._query("SELECT id, bytes, filename, purpose, created_at, tenant FROM files WHERE id = ?", (file_id,))
        return FileObject(*rows[0]) if rows else None

    def file_content(self, file_id: str) -> bytes | None:
        rows = self._query("SELECT data FROM files WHERE id = ?", (file_id,))
        return bytes(rows[0][0]) if rows else None

    def list_files(self, tenant: str | None) -> list[FileObject]:
        sql = "SELECT id, bytes, filename, purpose, created_at, tenant FROM files"
        rows = self._query(sql + " ORDER BY created_at DESC, id DESC" if tenant is None
                           else sql + " WHERE tenant = ? ORDER BY created_at DESC, id DESC",
                           () if tenant is None else (tenant,))
        return [FileObject(*r) for r in rows]

    def delete_file(self, file_id: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0

    # Jobs.
    def create_job(self, job: Job, lines: Sequence[JobLine]) -> None:
        assert job.request_counts.total == len(lines)
        with self._tx() as db:
            db.execute("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?)", (job.id, job.tenant, job.created_at,
                       job.status, job.retain_until, json.dumps(job.to_record())))
            db.executemany("INSERT INTO lines VALUES (?, ?, ?)",
                           [(job.id, line.index, json.dumps(line.to_record())) for line in lines])

    def get_job(self, job_id: str) -> Job | None:
        rows = self._query("SELECT record FROM jobs WHERE id = ?", (job_id,))
        return Job.from_record(json.loads(rows[0][0])) if rows else None

    def list_jobs(self, tenant: str | None, *, after: str | None = None, limit: int = 20) -> list[Job]:
        where, args = [], []
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        if after is not None:
            anchor = self._query("SELECT created_at, id FROM jobs WHERE id = ?", (after,))
            if anchor:
                where.append("(created_at < ? OR (created_at = ? AND id < ?))")
                args += [anchor[0][0], anchor[0][0], anchor[0][1]]
        sql = "SELECT record FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self._query(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit))
        return [Job.from_record(json.loads(r[0])) for r in rows]

    def transition(self, job_id: str, allowed_from: Sequence[str], status: str, **fields: Any) -> Job | None:
        with self._tx() as db:
            rows = db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchall()
            if not rows:
                return None
            job = Job.from_record(json.loads(rows[0][0]))
            if job.status not in allowed_from:
                return None
            for k, v in fields.items():
                setattr(job, k, v)
            job.status = status
            db.execute("UPDATE jobs SET status = ?, retain_until = ?, record = ? WHERE id = ?",
                       (status, job.retain_until, json.dumps(job.to_record()), job_id))
            return job

    def active_jobs(self) -> list[str]:
        marks = ",".join("?" * len(ACTIVE))
        return [r[0] for r in self._query(f"SELECT id FROM jobs WHERE status IN ({marks}) ORDER BY created_at, id", ACTIVE)]

    def expired(self, at: float) -> list[str]:
        marks = ",".join("?" * len(FINAL))
        return [r[0] for r in self._query(
            f"SELECT id FROM jobs WHERE status IN ({marks}) AND retain_until IS NOT NULL AND retain_until <= ?",
            (*FINAL, at))]

    def delete_job(self, job_id: str) -> None:
        with self._tx() as db:
            for table, key in (("jobs", "id"), ("lines", "job_id"), ("results", "job_id")):
                db.execute(f"DELETE FROM {table} WHERE {key} = ?", (job_id,))

    # Lines and results.
    def lines(self, job_id: str, indexes: Sequence[int]) -> list[JobLine]:
        out = []
        for start in range(0, len(indexes), 500):
            chunk = list(indexes[start:start + 500])
            marks = ",".join("?" * len(chunk))
            rows = self._query(f"SELECT record FROM lines WHERE job_id = ? AND idx IN ({marks}) ORDER BY idx",
                               (job_id, *chunk))
            out += [JobLine.from_record(json.loads(r[0])) for r in rows]
        return out

    def pending(self, job_id: str) -> list[int]:
        rows = self._query("SELECT idx FROM lines WHERE job_id = ? AND idx NOT IN "
                           "(SELECT idx FROM results WHERE job_id = ?) ORDER BY idx", (job_id, job_id))
        return [r[0] for r in rows]

    def commit(self, job_id: str, result: LineResult) -> bool:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM results WHERE job_id = ? AND idx = ?", (job_id, result.index)).fetchall():
                return False
            rows = db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchall()
            if not rows:
                return False
            seq = db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM results WHERE job_id = ?", (job_id,)).fetchone()[0]
            db.execute("INSERT INTO results VALUES (?, ?, ?, ?, ?)",
                       (job_id, result.index, seq, int(result.failed), json.dumps(result.to_record())))
            job = Job.from_record(json.loads(rows[0][0]))
            if result.failed:
                job.request_counts.failed += 1
            else:
                job.request_counts.completed += 1
            db.execute("UPDATE jobs SET record = ? WHERE id = ?", (json.dumps(job.to_record()), job_id))
            return True

    def results(self, job_id: str, offset: int = 0, limit: int = 1000) -> list[LineResult]:
        rows = self._query("SELECT seq, record FROM results WHERE job_id = ? AND seq >= ? ORDER BY seq LIMIT ?",
                           (job_id, offset, limit))
        return [LineResult.from_record(json.loads(r[1]), seq=r[0]) for r in rows]

    # Leases: one process uses the file, so they only need to exist in memory.
    def claim(self, job_id: str, owner: str, ttl_s: float) -> bool:
        with self._lock:
            holder = self._leases.get(job_id)
            if holder is not None and holder[0] != owner and holder[1] > time.monotonic():
                return False
            self._leases[job_id] = (owner, time.monotonic() + ttl_s)
            return True

    def release(self, job_id: str, owner: str) -> None:
        with self._lock:
            if self._leases.get(job_id, ("",))[0] == owner:
                del self._leases[job_id]

    def close(self) -> None:
        with self._lock:
            self._db.close()
