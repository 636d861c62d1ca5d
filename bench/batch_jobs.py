"""Durable batch jobs against one ``dsaserve local`` server: job throughput vs GenerateBatch, and
interactive time to first token while a job runs.

    .venv/bin/python -m bench.batch_jobs [--quick]

Starts one ``dsaserve local`` subprocess (the ``tiny`` preset of ``bench.common``, random weights,
gRPC + HTTP on free ports, a fresh SQLite jobs store in a temp folder) and measures, one after another:

1. **Job throughput.** N short requests (random prompt ids, 16–32 tokens, ``max_tokens`` 8,
   ``ignore_eos``) as one job (``Client.jobs.create``), timed from the create call until
   ``jobs.get(id).done`` (lines, commits and the output files written); then N other requests of the
   same shape over one gRPC ``GenerateBatch`` stream (``Client.generate_batch``), timed until its last
   result. Requests/s of each (median over ``--reps``), and job / GenerateBatch (goal ≥ 90 %).
2. **Interactive TTFT.** Sequential ``generate_stream`` calls (32-token prompt, ``max_tokens`` 8),
   time from the call to the first delta that carries tokens: first with the server idle, then while
   jobs of N requests run (another is created whenever fewer than max(64, N/4) lines are left
   pending, so every sample sees a busy job runner). p50 of each and under-job / idle (goal ≤ 1.5×).

Fresh random prompts everywhere (the prefix cache never hits). ``--quick``: N = 100, 10 samples, 1 rep.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import common as C

THROUGHPUT_GOAL = 0.90  # job requests/s ≥ 90 % of GenerateBatch's
TTFT_GOAL = 1.5  # interactive p50 TTFT under a job ≤ 1.5× idle


def extra_args(p) -> None:
    p.add_argument("--requests", type=int, default=None, help="N: requests per job / batch (default 1000, --quick 100)")
    p.add_argument("--samples", type=int, default=None, help="interactive TTFT samples per phase (default 30, --quick 10)")
    p.add_argument("--job-limit", action="append", default=[], metavar="NAME=N",
                   help="passed to dsaserve local (e.g. concurrency=8); default: the server's defaults")


class Server:
    """``dsaserve local`` in a subprocess; ``address`` once it printed its ready line."""

    def __init__(self, model: Path, store: Path, dtype: str, job_limits: list[str], log: Path) -> None:
        cmd = [sys.executable, "-m", "cluster.cli_serve", "local", "--model", str(model), "--port", "0",
               "--http-port", "0", "--jobs-store", str(store), "--dtype", dtype]
        for pair in job_limits:
            cmd += ["--job-limit", pair]
        self.log = log
        self._stderr = open(log, "w")  # noqa: SIM115 — closed in close()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     cwd=Path(__file__).resolve().parent.parent)
        self.ready_line = self._wait_ready(timeout_s=300)
        self.address = self.ready_line.split("ready on ", 1)[1].split()[0]

    def _wait_ready(self, timeout_s: float) -> str:
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        line = got[0] if got else ""
        if "ready on" not in line:
            raise RuntimeError(f"dsaserve local did not start ({line.strip()!r}); stderr: "
                               + self.log.read_text()[-2000:])
        return line.strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


def make_requests(n: int, tag: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"{tag}-{i}", "prompt_ids": C.random_ids(rng.randint(16, 32), seed * 100_003 + i),
             "max_tokens": 8, "ignore_eos": True} for i in range(n)]


def run_job(client, reqs: list[dict], poll_s: float = 0.05) -> tuple[float, object]:
    """Seconds from ``jobs.create`` until the job is done, and its final JobInfo."""
    t0 = time.perf_counter()
    job = client.jobs.create(reqs)
    while not job.done:
        time.sleep(poll_s)
        job = client.jobs.get(job.id)
    return time.perf_counter() - t0, job


def run_batch(client, reqs: list[dict]) -> tuple[float, int, int]:
    """Seconds of one GenerateBatch stream over ``reqs``; (seconds, results ok, errors)."""
    t0 = time.perf_counter()
    ok = errors = 0
    for r in client.generate_batch(reqs):
        if r.error is not None or r.completion is None:
            errors += 1
        else:
            ok += 1
    return time.perf_counter() - t0, ok, errors


def ttft(client, prompt: list[int]) -> float:
    """Seconds from the call to the first delta with tokens (the stream is then read to its end)."""
    t0 = time.perf_counter()
    first = None
    for d in client.generate_stream(prompt_ids=prompt, max_tokens=8, ignore_eos=True):
        if first is None and d.token_ids:
            first = time.perf_counter() - t0
        if d.error:
            raise RuntimeError(d.error)
    if first is None:
        raise RuntimeError("no token came back")
    return first


def percentile(xs: list[float], q: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, max(0, round(q * (len(ys) - 1))))]


def ttft_under_job(client, n: int, samples: int, seed: int) -> tuple[list[float], int, list[int]]:
    """TTFT samples while jobs of ``n`` lines run: before each sample, another job is created when
    fewer than a quarter of ``n`` lines (at least 64) are left pending, so the runner never runs dry.
    → (samples, jobs created, lines pending at each sample); the jobs still running are cancelled."""
    active: list[str] = []
    made = 0
    pending_at: list[int] = []
    out: list[float] = []
    for i in range(samples):
        infos = [client.jobs.get(j) for j in active]
        active = [j.id for j in infos if not j.done]
        pending = sum(j.total - j.completed - j.failed for j in infos if not j.done)
        if pending < max(64, n // 4):
            job = client.jobs.create(make_requests(n, f"load{made}", seed + 7919 * (made + 1)))
            made += 1
            active.append(job.id)
            pending += n
            deadline = time.monotonic() + 30  # until the runner has lines in flight (some committed)
            while client.jobs.get(job.id).completed == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
        pending_at.append(pending)
        out.append(ttft(client, C.random_ids(32, seed + 500 + i)))
    for j in active:
        client.jobs.cancel(j)
    for j in active:
        while not client.jobs.get(j).done:
            time.sleep(0.05)
    return out, made, pending_at


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], extra_args)
    n = args.requests or (100 if args.quick else 1000)
    samples = args.samples or (10 if args.quick else 30)
    reps = args.reps or (1 if args.quick else 3)
    C.print_header("Batch jobs: job throughput vs GenerateBatch, interactive TTFT under a job")
    model = C.checkpoint()
    from router.client import Client

    tmp = Path(tempfile.mkdtemp(prefix="dsaserve-bench-jobs-"))
    server = None
    try:
        server = Server(model, tmp / "jobs.sqlite3", args.dtype, args.job_limit, tmp / "server.log")
        print(f"server: `{server.ready_line}`  ")
        print(f"model: {model.name}; N = {n} requests (16–32 prompt ids, 8 new tokens, ignore_eos); "
              f"job limits: {', '.join(args.job_limit) or 'server defaults'}\n", flush=True)
        with Client(server.address, timeout=3600) as client:
            # Warm-up: a few requests of each path (first calls compile / allocate).
            client.generate(prompt_ids=C.random_ids(24, 1), max_tokens=8, ignore_eos=True)
            run_batch(client, make_requests(16, "warm-b", 2))
            run_job(client, make_requests(16, "warm-j", 3))

            job_s: list[float] = []
            batch_s: list[float] = []
            job_failed = batch_errors = 0
            for rep in range(reps):
                C.wait_quiet()
                t, info = run_job(client, make_requests(n, f"job{rep}", 10 + 2 * rep))
                job_s.append(t)
                job_failed += info.failed + (info.total - info.completed - info.failed)
                C.wait_quiet()
                t, ok, errors = run_batch(client, make_requests(n, f"batch{rep}", 11 + 2 * rep))
                batch_s.append(t)
                batch_errors += errors + (n - ok - errors)
            job_rps = [n / t for t in job_s]
            batch_rps = [n / t for t in batch_s]
            ratio = C.median(job_rps) / C.median(batch_rps)

            C.wait_quiet()
            idle = [ttft(client, C.random_ids(32, 900_000 + i)) for i in range(samples)]
            C.wait_quiet()
            loaded, jobs_used, progress = ttft_under_job(client, n, samples, 700_000)
        p50_idle, p50_load = C.median(idle), C.median(loaded)
        slow = p50_load / p50_idle
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(tmp, ignore_errors=True)

    print(C.markdown_table(
        ["measure", f"median (min–max, n={reps})", "unit"],
        [[f"job of {n} requests (create → done)", C.fmt_times(job_rps, digits=1), "requests/s"],
         [f"GenerateBatch of {n} requests", C.fmt_times(batch_rps, digits=1), "requests/s"],
         ["job seconds", C.fmt_times(job_s, digits=2), "s"],
         ["GenerateBatch seconds", C.fmt_times(batch_s, digits=2), "s"]]))
    print()
    print(C.markdown_table(
        ["interactive TTFT (32-token prompt, 8 tokens)", "p50 ms", "p90 ms", "min–max ms", "samples"],
        [["server idle", f"{1e3 * p50_idle:.1f}", f"{1e3 * percentile(idle, 0.9):.1f}",
          f"{1e3 * min(idle):.1f}–{1e3 * max(idle):.1f}", len(idle)],
         [f"while a job of {n} runs", f"{1e3 * p50_load:.1f}", f"{1e3 * percentile(loaded, 0.9):.1f}",
          f"{1e3 * min(loaded):.1f}–{1e3 * max(loaded):.1f}", len(loaded)]]))
    print(f"\n(load jobs created during the TTFT phase: {jobs_used}; job lines pending at "
          f"each sample: {progress}; each sample's ms: {[round(1e3 * x) for x in loaded]})  ")
    print(f"failed job lines: {job_failed}; GenerateBatch errors: {batch_errors}\n")
    verdict = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    print(C.markdown_table(
        ["goal", "measured", "result"],
        [[f"job throughput ≥ {100 * THROUGHPUT_GOAL:.0f} % of GenerateBatch",
          f"{100 * ratio:.1f} % ({C.median(job_rps):.1f} vs {C.median(batch_rps):.1f} req/s)",
          verdict(ratio >= THROUGHPUT_GOAL)],
         [f"interactive p50 TTFT under a job ≤ {TTFT_GOAL}× idle",
          f"{slow:.2f}× ({1e3 * p50_load:.1f} vs {1e3 * p50_idle:.1f} ms)", verdict(slow <= TTFT_GOAL)]]))
    C.print_footer()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
