"""What a server survives, as figures: the bad-input battery, random accepted sampling values,
overload with cancellations, and an engine exception in one request of a running batch.

    .venv/bin/python -m bench.reliability [--streams-per-slot 10] [--random 200] [--json]

Runs against a real ``dsaserve local`` server stack (``LocalBackend`` + ``start_server``) on the
embedded tiny model, in this process, on 127.0.0.1. Prints one markdown table (or JSON) of what was
tried and what held; ``docs/reliability.md`` records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import threading
import time
from pathlib import Path

import grpc

from bench.common import setup_threads
from cluster.local import LocalBackend, default_model_dir
from router.client import AsyncClient, Client, DsaServeError
from router.limits import RequestLimits
from router.server import server_port, start_server
from router.tokenizer import Tokenizer
from tests.battery import GOOD, GOOD_IDS, OTHER_CHECKS, cases, overload, run_battery
from workers.engine.config import EngineConfig

QUEUE = 8
LIMITS = RequestLimits(max_prompt_chars=20000, max_message_bytes=256 * 1024)


def random_sampling(address: str, n: int, vocab: int, seed: int = 0) -> dict:
    """``n`` requests with random values from the whole accepted range of every sampling field."""
    rng = random.Random(seed)
    crashed, finished = 0, 0
    with Client(address, timeout=120) as c:
        for _ in range(n):
            params = {
                "temperature": rng.choice([0.0, 1e-40, 1e-6, rng.uniform(0, 100), 100.0]),
                "top_p": rng.choice([1e-300, 1e-9, rng.uniform(1e-6, 1), 1.0]),
                "top_k": rng.choice([0, 1, rng.randrange(vocab + 1), vocab]),
                "seed": rng.choice([0, 2**63 - 1, rng.randrange(2**63)]),
                "logprobs": rng.choice([None, 0, 20]),
            }
            try:
                out = c.generate(prompt_ids=GOOD_IDS, max_tokens=3, **params)
                finished += out.finish_reason in ("length", "stop")
            except DsaServeError:
                crashed += 1
    return {"requests": n, "finished": finished, "failed": crashed}


def engine_fault(backend: LocalBackend, address: str, reference: tuple[int, ...]) -> dict:
    """Four requests decode together; the forward raises whenever one of them (marked by a token of
    its prompt) is in the batch. That one must end with an error, the others with their tokens."""
    poison = 77
    runner = backend.decode_engine.runner
    real = runner.run

    def faulty(work, num_decodes, sampled):
        if any(poison in seq.request.prompt_token_ids for seq, _ in work):
            raise RuntimeError("injected fault")
        return real(work, num_decodes, sampled)

    async def run() -> list:
        async with AsyncClient(address, timeout=120) as client:
            prompts = [GOOD_IDS, [0, poison, 5, 6], GOOD_IDS, GOOD_IDS]
            return await asyncio.gather(*(client.generate(prompt_ids=p, **{**GOOD, "max_tokens": 8})
                                          for p in prompts), return_exceptions=True)

    runner.run = faulty
    try:
        results = asyncio.run(run())
    finally:
        runner.run = real
    ok = sum(1 for r in results if not isinstance(r, BaseException) and r.token_ids[: len(reference)] == reference)
    failed = sum(1 for r in results if isinstance(r, BaseException))
    with Client(address, timeout=60) as c:
        after = c.generate(prompt_ids=GOOD_IDS, **GOOD).token_ids == reference and c.health() == "SERVING"
    return {"requests": 4, "faulty": 1, "others_correct": ok, "failed": failed, "serving_after": after}


def idle(backend: LocalBackend) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = backend.stats()
        if stats["router"]["in_flight"] == 0 and all(w.free_blocks == w.total_blocks for w in stats["workers"]):
            return True
        time.sleep(0.05)
    return False


async def serve(backend: LocalBackend, tokenizer) -> grpc.aio.Server:
    return await start_server(backend, tokenizer, "127.0.0.1", 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--streams-per-slot", type=int, default=10, help="overload: streams per admission slot")
    p.add_argument("--random", type=int, default=200, help="requests with random accepted sampling values")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    threads = setup_threads()
    model = args.model or default_model_dir()
    config = EngineConfig(max_model_len=512, num_blocks=256, max_queue=QUEUE)
    report: dict = {}
    with LocalBackend.start(model, engine_config=config, limits=LIMITS, num_threads=threads) as backend:
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        server = asyncio.run_coroutine_threadsafe(serve(backend, Tokenizer.load(model)), loop).result(60)
        address = f"127.0.0.1:{server_port(server)}"
        with Client(address, timeout=60) as c:
            reference = c.generate(prompt_ids=GOOD_IDS, **GOOD).token_ids
            (info,) = c.list_models()
        with grpc.insecure_channel(address) as channel:
            start = time.perf_counter()
            problems = run_battery(channel, reference)
        checks = len(cases(info)) + OTHER_CHECKS
        report["battery"] = {"checks": checks, "held": checks - len(problems),
                             "seconds": round(time.perf_counter() - start, 1), "problems": problems}
        report["random_sampling"] = random_sampling(address, args.random, info.vocab_size)
        report["overload"] = asyncio.run(overload(address, args.streams_per_slot * QUEUE, reference,
                                                  max_tokens=16, timeout=300))
        report["overload"]["all_blocks_free_after"] = idle(backend)
        report["engine_fault"] = engine_fault(backend, address, reference)
        report["engine_fault"]["all_blocks_free_after"] = idle(backend)
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print("| what was tried | what held |\n| --- | --- |")
    for name, figures in report.items():
        print(f"| {name} | " + ", ".join(f"{k} {v}" for k, v in figures.items() if k != "problems") + " |")


if __name__ == "__main__":
    main()
