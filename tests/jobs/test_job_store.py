"""The ``JobStore`` contract (router/jobs/store.py), for SQLite and for a real Redis: durable across a
reopen, exactly-once commits with gap-free sequence numbers under concurrency, atomic status changes,
leases that lapse, expiry, files."""

from __future__ import annotations

import threading
import time

from router.jobs.types import FileObject, Job, JobLine, LineResult, RequestCounts, new_id


def make_job(store, n: int = 5, *, tenant: str = "", created_at: int | None = None) -> Job:
    job = Job(id=new_id("batch"), endpoint="/v1/completions", input_file_id=None,
              request_counts=RequestCounts(total=n), tenant=tenant)
    if created_at is not None:
        job.created_at = created_at
    lines = [JobLine(i, f"req-{i}", "/v1/completions", {"prompt": f"p{i}"}) for i in range(n)]
    store.create_job(job, lines)
    return job


def ok(i: int) -> LineResult:
    return LineResult(i, f"req-{i}", completion={"text": f"t{i}", "token_ids": [i]})


def err(i: int) -> LineResult:
    return LineResult(i, f"req-{i}", error={"code": "INVALID_ARGUMENT", "message": "bad", "param": "prompt",
                                            "status": 400})


def test_jobs_and_lines_survive_a_reopen(stores) -> None:
    store = stores.open()
    job = make_job(store, 4, tenant="t1")
    assert store.commit(job.id, ok(2))
    again = stores.open()
    got = again.get_job(job.id)
    assert got is not None and got.request_counts == RequestCounts(total=4, completed=1, failed=0)
    assert got.tenant == "t1" and got.endpoint == "/v1/completions"
    assert again.pending(job.id) == [0, 1, 3]
    assert [line.custom_id for line in again.lines(job.id, [3, 0])] == ["req-0", "req-3"]
    assert again.lines(job.id, [1])[0].body == {"prompt": "p1"}
    assert [r.index for r in again.results(job.id)] == [2]
    assert again.get_job("batch_missing") is None


def test_commit_is_exactly_once_and_counts_move(stores) -> None:
    store = stores.open()
    job = make_job(store, 3)
    assert store.commit(job.id, ok(0))
    assert not store.commit(job.id, err(0))  # the first result stays
    assert store.commit(job.id, err(1))
    got = store.get_job(job.id)
    assert got.request_counts == RequestCounts(total=3, completed=1, failed=1)
    results = store.results(job.id)
    assert [(r.seq, r.index, r.failed) for r in results] == [(0, 0, False), (1, 1, True)]
    assert results[0].completion == {"text": "t0", "token_ids": [0]}
    assert results[1].error["param"] == "prompt"
    assert store.pending(job.id) == [2]
    assert [r.seq for r in store.results(job.id, offset=1)] == [1]
    assert store.results(job.id, offset=2) == []


def test_concurrent_commits_get_gap_free_sequence_numbers(stores) -> None:
    n = 60
    store = stores.open()
    job = make_job(store, n)
    others = [stores.open() for _ in range(3)]  # as several routers would
    wins: list[bool] = []

    def commit_all(s) -> None:
        for i in range(n):
            wins.append(s.commit(job.id, ok(i) if i % 3 else err(i)))

    threads = [threading.Thread(target=commit_all, args=(s,)) for s in [store, *others]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(wins) == n
    results = store.results(job.id, limit=10 * n)
    assert [r.seq for r in results] == list(range(n))
    assert sorted(r.index for r in results) == list(range(n))
    assert store.get_job(job.id).request_counts == RequestCounts(total=n, completed=n - n // 3, failed=n // 3)
    assert store.pending(job.id) == []


def test_transition_is_atomic(stores) -> None:
    store = stores.open()
    job = make_job(store, 1)
    assert store.transition(job.id, ("completed",), "cancelled") is None  # not from in_progress
    winners: list[str] = []

    def race(status: str) -> None:
        s = stores.open()
        for _ in range(1):
            if s.transition(job.id, ("in_progress",), status, **{f"{status}_at": 123}) is not None:
                winners.append(status)

    threads = [threading.Thread(target=race, args=(s,)) for s in ("cancelling", "finalizing") * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    got = store.get_job(job.id)
    assert got.status == winners[0] and getattr(got, f"{winners[0]}_at") == 123
    assert store.transition("batch_missing", ("in_progress",), "failed") is None


def test_list_is_newest_first_paged_and_per_tenant(stores) -> None:
    store = stores.open()
    a = make_job(store, 1, tenant="a", created_at=100)
    b = make_job(store, 1, tenant="b", created_at=200)
    c = make_job(store, 1, tenant="a", created_at=300)
    assert [j.id for j in store.list_jobs(None)] == [c.id, b.id, a.id]
    assert [j.id for j in store.list_jobs("a")] == [c.id, a.id]
    assert [j.id for j in store.list_jobs(None, after=c.id, limit=1)] == [b.id]
    assert [j.id for j in store.list_jobs(None, after=b.id)] == [a.id]
    assert set(store.active_jobs()) >= {a.id, b.id, c.id}
    assert store.active_jobs().index(a.id) < store.active_jobs().index(c.id)  # oldest first


def test_expiry_finds_finished_jobs_past_retention_and_delete_removes_them(stores) -> None:
    store = stores.open()
    done = make_job(store, 2)
    running = make_job(store, 2)
    store.commit(done.id, ok(0))
    store.transition(done.id, ("in_progress",), "completed", completed_at=1, retain_until=time.time() - 1)
    store.transition(running.id, ("in_progress",), "in_progress", retain_until=time.time() - 1)
    assert store.expired(time.time()) == [done.id]  # an active job never expires
    assert done.id not in store.active_jobs()
    store.delete_job(done.id)
    assert store.get_job(done.id) is None and store.results(done.id) == [] and store.pending(done.id) == []
    assert stores.open().get_job(running.id) is not None


def test_files(stores) -> None:
    store = stores.open()
    f1 = FileObject(new_id("file"), 3, "in.jsonl", "batch", created_at=10, tenant="a")
    f2 = FileObject(new_id("file"), 0, "out.jsonl", "batch_output", created_at=20, tenant="b")
    store.put_file(f1, b"abc")
    store.put_file(f2, b"")
    again = stores.open()
    assert again.get_file(f1.id) == f1 and again.file_content(f1.id) == b"abc"
    assert again.file_content(f2.id) == b""
    assert [f.id for f in again.list_files(None)] == [f2.id, f1.id]
    assert [f.id for f in again.list_files("a")] == [f1.id]
    assert again.delete_file(f1.id) and not again.delete_file(f1.id)
    assert again.get_file(f1.id) is None and again.file_content(f1.id) is None


def test_leases_hold_then_lapse(stores) -> None:
    store = stores.open()
    job = make_job(store, 1)
    assert store.claim(job.id, "router-a", ttl_s=0.5)
    assert store.claim(job.id, "router-a", ttl_s=0.5)  # renewing
    assert not store.claim(job.id, "router-b", ttl_s=0.5)
    time.sleep(0.7)
    assert store.claim(job.id, "router-b", ttl_s=5)
    store.release(job.id, "router-a")  # not the holder: nothing changes
    assert not store.claim(job.id, "router-a", ttl_s=5)
    store.release(job.id, "router-b")
    assert store.claim(job.id, "router-a", ttl_s=5)
