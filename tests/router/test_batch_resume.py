"""``dsaserve batch`` resumes right: a rerun retries the lines that failed transiently (a crashed
engine, a queue that stayed full) and skips successes and permanent errors, with real engines."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from cluster.local import LocalBackend
from router.batch import BatchJob
from router.frontend import CompletionRequest, Frontend
from workers.engine.config import EngineConfig
from workers.parallel import ExpertParallelError

POISON = (7, 7, 7, 7)  # a prompt starting with these fails its forward (that request alone fails)
DEAD = (8, 8, 8, 8)  # ... with these, an expert-parallel rank dies: the engine loop stops


def _line(id_: str, seed: int, **kw) -> str:
    return json.dumps({"id": id_, "prompt_ids": [10 + seed + i for i in range(12)], "max_tokens": 3,
                       "ignore_eos": True, **kw})


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _results(path: Path) -> dict[str, dict]:
    """Per id, the last successful line, else the last line (the module's rule)."""
    out: dict[str, dict] = {}
    for d in _lines(path):
        if "error" not in d or "error" in out.get(d["id"], {"error": 1}):
            out[d["id"]] = d
    return out


def _run(job: BatchJob, backend: LocalBackend, **kw):
    return asyncio.run(job.run(Frontend(backend, None), **kw))


def test_transient_errors_are_retried_and_the_rest_skipped(tmp_path: Path, tiny_dir: Path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join([
        _line("g0", 0), _line("g1", 1),
        _line("bad", 2, temperature=-1),
        json.dumps({"id": "poison", "prompt_ids": [*POISON, 20, 21], "max_tokens": 3}),
        _line("g2", 3),
        json.dumps({"id": "dead", "prompt_ids": [*DEAD, 20, 21], "max_tokens": 3}),
        _line("g3", 4),
        _line("g0", 5),  # a repeated id: the first line is g0's request
    ]) + "\n")

    with LocalBackend.start(tiny_dir, engine_config=EngineConfig(num_blocks=64), disaggregate=False) as be:
        runner = be.decode_engine.runner
        real = runner.run

        def crash_on_poison(work, num_decodes, sampled):
            heads = {tuple(seq.token_ids[:4]) for seq, _ in work}
            if POISON in heads:
                raise RuntimeError("bad batch")
            if DEAD in heads:
                raise ExpertParallelError("rank 1 died")
            return real(work, num_decodes, sampled)

        runner.run = crash_on_poison
        job = BatchJob.open(inp, out)
        assert job.duplicates == ("line 8: id 'g0' (first on line 1)",)
        first = _run(job, be, concurrency=1)  # in order: after "dead" the engine is gone
    assert (first.done, first.failed, first.skipped, first.retried) == (7, 4, 0, 0)
    r = _results(out)
    for rid in ("g0", "g1", "g2"):
        assert "error" not in r[rid] and len(r[rid]["token_ids"]) == 3
    assert r["bad"]["error"] == {"code": "INVALID_ARGUMENT", "field": "temperature",
                                 "message": r["bad"]["error"]["message"], "transient": False}
    for rid in ("poison", "dead"):
        assert r[rid]["finish_reason"] == "error"
        assert r[rid]["error"]["code"] == "INTERNAL" and r[rid]["error"]["transient"] is True
    assert r["g3"]["error"]["code"] == "UNAVAILABLE" and r["g3"]["error"]["transient"] is True
    assert [d["id"] for d in _lines(out)].count("g0") == 1  # the repeated line wrote nothing

    # The engine is back (a new process): only the transient failures run again.
    with LocalBackend.start(tiny_dir, engine_config=EngineConfig(num_blocks=64), disaggregate=False) as be:
        job = BatchJob.open(inp, out)
        assert sorted(i.id for i in job.items) == ["dead", "g3", "poison"]
        second = _run(job, be)
        assert (second.done, second.failed, second.skipped, second.retried) == (3, 0, 4, 3)
        again = _results(out)
        for rid in ("dead", "g3", "poison"):
            assert "error" not in again[rid] and len(again[rid]["token_ids"]) == 3
        assert all(again[rid] == r[rid] for rid in ("g0", "g1", "g2", "bad"))
        assert len(_lines(out)) == 10  # appended, never rewritten

        # Everything settled: a third run has nothing to do; a success is never overwritten.
        third = BatchJob.open(inp, out)
        assert third.items == [] and third.skipped == 7
        assert _run(third, be).done == 0 and len(_lines(out)) == 10


def test_an_old_transient_line_after_a_success_does_not_rerun_the_id(tmp_path: Path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(_line("a", 0) + "\n" + _line("b", 1) + "\n" + _line("c", 2) + "\n")
    out.write_text("\n".join(json.dumps(d) for d in [
        {"id": "a", "token_ids": [1], "text": "", "finish_reason": "length", "usage": {}, "ttft_ms": 1.0},
        {"id": "a", "error": {"code": "UNAVAILABLE", "field": None, "message": "later failure"}},
        {"id": "b", "error": {"code": "INTERNAL", "field": None, "message": "older output, no flag"}},
        {"id": "c", "error": {"code": "INVALID_ARGUMENT", "field": "x", "message": "permanent"}},
    ]) + "\n")
    job = BatchJob.open(inp, out)
    assert [i.id for i in job.items] == ["b"] and (job.skipped, job.retried) == (2, 1)


def test_a_queue_full_past_the_wait_is_retried_on_the_next_run(tmp_path: Path, tiny_dir: Path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(_line("x", 0) + "\n" + _line("y", 1) + "\n")
    config = EngineConfig(num_blocks=64, max_queue=1)
    with LocalBackend.start(tiny_dir, engine_config=config, disaggregate=False) as be:
        frontend = Frontend(be, None)

        async def with_the_queue_held():
            hog = CompletionRequest(prompt_ids=tuple(range(30, 60)),
                                    params=json_params(max_tokens=100))
            stream = frontend.generate(hog)
            await stream.__anext__()  # admitted, and holds the only slot while the stream is open
            try:
                return await BatchJob.open(inp, out).run(frontend, concurrency=2, admission_wait_s=0.3)
            finally:
                await stream.aclose()

        first = asyncio.run(with_the_queue_held())
        assert (first.done, first.failed) == (2, 2)
        assert {d["error"]["code"] for d in _lines(out)} == {"RESOURCE_EXHAUSTED"}
        assert all(d["error"]["transient"] for d in _lines(out))

        job = BatchJob.open(inp, out)
        assert job.retried == 2
        second = asyncio.run(job.run(frontend, concurrency=2, admission_wait_s=0.3))
    assert (second.done, second.failed) == (2, 0)
    assert all("error" not in r and len(r["token_ids"]) == 3 for r in _results(out).values())


def json_params(**kw):
    return CompletionRequest.from_json({"prompt_ids": [1], "ignore_eos": True, **kw}).params
