"""``JobStore`` in Redis (cluster mode: every router replica shares one server).

Key layout (``P`` is the prefix, ``dsaserve:jobs`` by default; every value is bytes or JSON):

- ``P:job:{id}``      hash: ``record`` (``Job.to_record()`` JSON), ``completed``, ``failed`` (the counts
  live in their own fields, moved by ``commit``, so ``transition`` rewriting ``record`` never clobbers
  them; ``get_job`` merges them in)
- ``P:lines:{id}``    hash: line index -> ``JobLine`` JSON
- ``P:results:{id}``  hash: line index -> ``LineResult`` JSON;  ``P:seq:{id}``: list of line indexes in
  commit order (a result's seq is its position)
- ``P:jobs``, ``P:tjobs:{tenant}``   zsets of job ids by ``created_at`` (listing; equal scores order by id)
- ``P:active``        zset of active job ids by ``created_at``
- ``P:retain``        zset of final job ids with a ``retain_until``, by ``retain_until`` (expiry)
- ``P:lease:{id}``    string: the owner, with a TTL
- ``P:file:{id}``     hash: ``meta`` (FileObject JSON), ``data`` (raw bytes);  ``P:files``,
  ``P:tfiles:{tenant}``: zsets of file ids by ``created_at``

Durability: a call returns once the server applied the write, so a killed router loses nothing; a
killed *server* keeps it only as far as its persistence config does (``appendonly yes`` with
``appendfsync always``/``everysec``). The Lua scripts touch several keys, so this needs one Redis
(or a Sentinel-managed primary), not Redis Cluster.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import redis

from router.jobs.types import ACTIVE, FINAL, FileObject, Job, JobLine, LineResult, RequestCounts

# KEYS: results, seq, job. ARGV: index, result JSON, count field. The seq (list length) and the
# count move together with the result, so concurrent routers get gap-free seqs and exact counts.
_COMMIT = """
if redis.call('EXISTS', KEYS[3]) == 0 or redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return -1
end
local seq = redis.call('LLEN', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
return seq
"""

# KEYS: job, active, retain. ARGV: record read, new record, job id, created_at, kind
# ("active"/"final"/""), retain_until ("" for none). A compare-and-set on the record: the caller
# checked ``allowed_from`` against the record it read; if the record changed since, it retries.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'record')
if not cur then return {0, 0, 0} end
if cur ~= ARGV[1] then return {2, 0, 0} end
redis.call('HSET', KEYS[1], 'record', ARGV[2])
if ARGV[5] == 'active' then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
else
  redis.call('ZREM', KEYS[2], ARGV[3])
end
if ARGV[5] == 'final' and ARGV[6] ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[3])
else
  redis.call('ZREM', KEYS[3], ARGV[3])
end
local c = redis.call('HMGET', KEYS[1], 'completed', 'failed')
return {1, tonumber(c[1]) or 0, tonumber(c[2]) or 0}
"""

# KEYS: lease. ARGV: owner, ttl in ms. Take a free lease, or renew one the owner holds.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


def _kind(status: str) -> str:
    return "active" if status in ACTIVE else "final" if status in FINAL else ""


class RedisJobStore:
    """See ``router.jobs.store`` for the contract. Thread-safe: every call takes a connection from the
    client's pool."""

    def __init__(self, client: redis.Redis, *, prefix: str = "dsaserve:jobs") -> None:
        self._r = client
        self.prefix = prefix
        self._commit = client.register_script(_COMMIT)
        self._transition = client.register_script(_TRANSITION)
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "dsaserve:jobs", **options: Any) -> RedisJobStore:
        """``options`` go to ``redis.Redis.from_url`` (``password``, ``ssl_*``, ``socket_timeout``...)."""
        options["decode_responses"] = False  # file contents are raw bytes
        return cls(redis.Redis.from_url(url, **options), prefix=prefix)

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # Files.
    def put_file(self, file: FileObject, data: bytes) -> None:
        meta = json.dumps({"id": file.id, "bytes": file.bytes, "filename": file.filename,
                           "purpose": file.purpose, "created_at": file.created_at, "tenant": file.tenant})
        with self._r.pipeline(transaction=True) as p:
            p.hset(self._k("file", file.id), mapping={"meta": meta, "data": data})
            p.zadd(self._k("files"), {file.id: file.created_at})
            p.zadd(self._k("tfiles", file.tenant), {file.id: file.created_at})
            p.execute()

    def get_file(self, file_id: str) -> FileObject | None:
        meta = self._r.hget(self._k("file", file_id), "meta")
        return FileObject(**json.loads(meta)) if meta is not None else None

    def file_content(self, file_id: str) -> bytes | None:
        return self._r.hget(self._k("file", file_id), "data")

    def list_files(self, tenant: str | None) -> list[FileObject]:
        ids = self._r.zrevrange(self._k("files") if tenant is None else self._k("tfiles", tenant), 0, -1)
        with self._r.pipeline(transaction=False) as p:
            for fid in ids:
                p.hget(self._k("file", fid.decode()), "meta")
            metas = p.execute()
        return [FileObject(**json.loads(m)) for m in metas if m is not None]

    def delete_file(self, file_id: str) -> bool:
        file = self.get_file(file_id)
        if file is None:
            return False
        with self._r.pipeline(transaction=True) as p:
            p.delete(self._k("file", file_id))
            p.zrem(self._k("files"), file_id)
            p.zrem(self._k("tfiles", file.tenant), file_id)
            return p.execute()[0] > 0

    # Jobs.
    def create_job(self, job: Job, lines: Sequence[JobLine]) -> None:
        assert job.request_counts.total == len(lines)
        kind = _kind(job.status)
        with self._r.pipeline(transaction=True) as p:
            p.hset(self._k("job", job.id), mapping={"record": json.dumps(job.to_record()),
                                                    "completed": job.request_counts.completed,
                                                    "failed": job.request_counts.failed})
            for start in range(0, len(lines), 1000):
                p.hset(self._k("lines", job.id),
                       mapping={str(x.index): json.dumps(x.to_record()) for x in lines[start:start + 1000]})
            p.zadd(self._k("jobs"), {job.id: job.created_at})
            p.zadd(self._k("tjobs", job.tenant), {job.id: job.created_at})
            if kind == "active":
                p.zadd(self._k("active"), {job.id: job.created_at})
            elif kind == "final" and job.retain_until is not None:
                p.zadd(self._k("retain"), {job.id: job.retain_until})
            p.execute()

    @staticmethod
    def _job(raw: dict[bytes, bytes]) -> Job | None:
        """A job from its hash, with the counts from their own fields."""
        if b"record" not in raw:
            return None
        job = Job.from_record(json.loads(raw[b"record"]))
        job.request_counts = RequestCounts(total=job.request_counts.total,
                                           completed=int(raw.get(b"completed", 0)),
                                           failed=int(raw.get(b"failed", 0)))
        return job

    def get_job(self, job_id: str) -> Job | None:
        return self._job(self._r.hgetall(self._k("job", job_id)))

    def list_jobs(self, tenant: str | None, *, after: str | None = None, limit: int = 20) -> list[Job]:
        key = self._k("jobs") if tenant is None else self._k("tjobs", tenant)
        anchor = self._r.zscore(self._k("jobs"), after) if after is not None else None
        if anchor is None:  # no (or an unknown) anchor: from the newest
            ids = [i.decode() for i in self._r.zrevrange(key, 0, limit - 1)] if limit > 0 else []
        else:  # same created_at with a smaller id, then anything older
            ties = sorted((i.decode() for i in self._r.zrangebyscore(key, anchor, anchor)
                           if i.decode() < after), reverse=True)
            older = self._r.zrevrangebyscore(key, f"({anchor!r}", "-inf", start=0, num=limit)
            ids = (ties + [i.decode() for i in older])[:limit]
        with self._r.pipeline(transaction=False) as p:
            for job_id in ids:
                p.hgetall(self._k("job", job_id))
            jobs = [self._job(raw) for raw in p.execute()]
        return [j for j in jobs if j is not None]

    def transition(self, job_id: str, allowed_from: Sequence[str], status: str, **fields: Any) -> Job | None:
        key = self._k("job", job_id)
        while True:
            old = self._r.hget(key, "record")
            if old is None:
                return None
            job = Job.from_record(json.loads(old))
            if job.status not in allowed_from:
                return None
            for name, value in fields.items():
                setattr(job, name, value)
            job.status = status
            retain = "" if job.retain_until is None else repr(float(job.retain_until))
            code, completed, failed = self._transition(
                keys=[key, self._k("active"), self._k("retain")],
                args=[old, json.dumps(job.to_record()), job_id, job.created_at, _kind(status), retain])
            if code == 0:
                return None
            if code == 1:
                job.request_counts = RequestCounts(job.request_counts.total, int(completed), int(failed))
                return job
            # code 2: someone changed the record since we read it; decide again on the new one.

    def active_jobs(self) -> list[str]:
        return [i.decode() for i in self._r.zrange(self._k("active"), 0, -1)]

    def expired(self, at: float) -> list[str]:
        return [i.decode() for i in self._r.zrangebyscore(self._k("retain"), "-inf", repr(float(at)))]

    def delete_job(self, job_id: str) -> None:
        job = self.get_job(job_id)
        with self._r.pipeline(transaction=True) as p:
            p.delete(*(self._k(kind, job_id) for kind in ("job", "lines", "results", "seq", "lease")))
            for index in ("jobs", "active", "retain"):
                p.zrem(self._k(index), job_id)
            if job is not None:
                p.zrem(self._k("tjobs", job.tenant), job_id)
            p.execute()

    # Lines and results.
    def lines(self, job_id: str, indexes: Sequence[int]) -> list[JobLine]:
        if not indexes:
            return []
        found = self._r.hmget(self._k("lines", job_id), [str(i) for i in sorted(set(indexes))])
        return [JobLine.from_record(json.loads(r)) for r in found if r is not None]

    def pending(self, job_id: str) -> list[int]:
        with self._r.pipeline(transaction=False) as p:
            p.hkeys(self._k("lines", job_id))
            p.hkeys(self._k("results", job_id))
            lines, done = p.execute()
        return sorted({int(i) for i in lines} - {int(i) for i in done})

    def commit(self, job_id: str, result: LineResult) -> bool:
        seq = self._commit(keys=[self._k("results", job_id), self._k("seq", job_id), self._k("job", job_id)],
                           args=[str(result.index), json.dumps(result.to_record()),
                                 "failed" if result.failed else "completed"])
        return int(seq) >= 0

    def results(self, job_id: str, offset: int = 0, limit: int = 1000) -> list[LineResult]:
        if limit <= 0:
            return []
        offset = max(offset, 0)
        indexes = self._r.lrange(self._k("seq", job_id), offset, offset + limit - 1)
        if not indexes:
            return []
        records = self._r.hmget(self._k("results", job_id), indexes)
        return [LineResult.from_record(json.loads(r), seq=offset + n)
                for n, r in enumerate(records) if r is not None]

    # Leases (shared by every router).
    def claim(self, job_id: str, owner: str, ttl_s: float) -> bool:
        return bool(self._claim(keys=[self._k("lease", job_id)], args=[owner, max(1, int(ttl_s * 1000))]))

    def release(self, job_id: str, owner: str) -> None:
        self._release(keys=[self._k("lease", job_id)], args=[owner])

    def close(self) -> None:
        self._r.close()
