"""The scheduler admits waiting requests by priority (lower first), first come first served within a
priority, and ages waiting requests so that a stream of more urgent ones never starves an old one."""

from __future__ import annotations

from kvstore.block_pool import BlockPool
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.scheduler import Scheduler
from workers.engine.sequence import Sequence
from workers.engine.types import GenerateRequest, SamplingParams
from workers.model import load_model

from .conftest import prompt


def test_a_saturated_engine_admits_a_later_urgent_request_first(tiny_ckpt):
    engine = Engine(load_model(tiny_ckpt), EngineConfig(num_blocks=32, block_size=16, max_num_seqs=1))
    first_token: list[str] = []

    def submit(rid: str, priority: int, seed: int) -> None:
        def sink(out):
            if out.new_token_ids and rid not in first_token:
                first_token.append(rid)

        params = SamplingParams(max_tokens=3, ignore_eos=True)
        engine.add_request(GenerateRequest(rid, prompt(12, seed=seed), params, priority=priority), sink)

    submit("running", 0, 1)
    engine.step()  # "running" holds the only slot
    submit("patient", 5, 2)  # arrives first, less urgent
    submit("urgent", 0, 3)
    submit("urgent-too", 0, 4)
    while engine.has_work():
        engine.step()
    assert first_token == ["running", "urgent", "urgent-too", "patient"]


def _seq(rid: str, priority: int, arrival: float) -> Sequence:
    request = GenerateRequest(rid, (1, 2, 3, 4), priority=priority)
    return Sequence(request=request, token_ids=list(request.prompt_token_ids), prompt_len=4, extra=b"", arrival=arrival)


def test_an_old_request_is_admitted_under_a_continuous_stream_of_urgent_ones():
    """One slot; a priority-10 request waits while a priority-0 one arrives every 0.1 s (at 0.15 s,
    0.25 s, ...). With 0.55 s of waiting worth one level, it goes ahead of those arriving more than
    5.5 s after it."""
    cfg = EngineConfig(num_blocks=4, block_size=16, max_num_seqs=1, priority_aging_s=0.55)
    pool = BlockPool(cfg.num_blocks)
    scheduler = Scheduler(cfg, pool)
    scheduler.add(_seq("old", priority=10, arrival=0.0))
    admitted = []
    for i in range(1, 80):
        scheduler.add(_seq(f"new-{i}", priority=0, arrival=i / 10 + 0.05))
        out = scheduler.schedule()
        (seq, _), = out.prefills
        admitted.append(seq.request_id)
        scheduler.remove(seq)  # it finishes before the next arrival
        pool.release(seq.block_table)
        if seq.request_id == "old":
            break
    assert admitted == [f"new-{i}" for i in range(1, 55)] + ["old"]


def test_equal_priorities_are_first_come_first_served_and_preempted_sequences_go_first():
    cfg = EngineConfig(num_blocks=8, block_size=16, max_num_seqs=1)
    scheduler = Scheduler(cfg, BlockPool(cfg.num_blocks))
    for i, rid in enumerate(["a", "b", "c"]):
        scheduler.add(_seq(rid, priority=3, arrival=float(i)))
    back = _seq("preempted", priority=9, arrival=5.0)
    back.admitted_once = True  # it ran before and lost its blocks
    scheduler.add(back)
    scheduler.add(_seq("urgent", priority=-3, arrival=4.0))  # 6 levels ahead: worth 6 s
    assert [s.request_id for s in scheduler.waiting] == ["preempted", "urgent", "a", "b", "c"]
