"""KV transfer between two processes: NIXL READ vs a plain memcpy (and the Ray object store).

    .venv/bin/python -m bench.transfer [--quick] [--reps N] [--no-ray]

The KV of a 4K- and a 32K-token prompt in two layouts: the ``tiny`` preset as the CPU engine stores it
(fp32 latents, fp32 indexer keys: 86,784 B per 64-token block) and the 671B model's per-token KV
(61 layers × (656 B FP8 latent with scales and bf16 RoPE part + 132 B FP8 indexer key and scale), 64-token
blocks: 3,076,352 B per block), each a real ``PagedKVStorage``.

- NIXL: the holder (``NixlHolder``) lives in a "spawn" child process; this process READs through
  ``NixlTransfer.read`` (the engine's call: validation, descriptors, post, poll, notification). Block
  ids are shuffled on both sides as in a real pool (one descriptor per block); "one run" reads
  consecutive blocks into consecutive blocks (one descriptor). Bytes are verified after timing.
- memcpy: ``dst.copy_(src)`` of the same bytes into a warm preallocated buffer in one process (the
  limit on one machine); ``clone`` allocates its destination each time (page faults included).
- Every buffer (holder pool, reader pool, memcpy's) is backed by 2 MiB pages as ``NixlHolder`` and
  ``NixlTransfer`` do by default (``--no-huge-pages``: 4 KiB pages everywhere).
- Rounds interleave NIXL and memcpy per case and start when the (shared) machine is quiet.
- ray: the lead's ``cluster/ray_transfer.py`` backend end to end (``RayHolder.endpoint`` in an actor
  puts the blocks' bytes, ``RayTransfer.read`` gets them here); "n/a" without Ray or that module.

Goal (from the issue): NIXL ≥ 50 % of memcpy for the 32K prompt's KV.
"""

from __future__ import annotations

import gc
import importlib.util
import multiprocessing as mp
import random
import time
import uuid
from pathlib import Path

import torch

from bench import common as C
from kvstore.nixl_transfer import NixlTransfer, advise_huge_pages
from kvstore.paged import BlockLayout, PagedKVStorage

BLOCK = 64
GOAL = 0.5


def tiny_layout() -> dict:
    c = C.model_config("tiny")
    return dict(num_layers=c.num_hidden_layers, block_size=BLOCK, latent_dim=c.latent_dim, latent_dtype=torch.float32,
                index_dim=c.index_head_dim, index_dtype=torch.float32)


def v32_layout() -> dict:
    # One byte per "dim": 656 latent bytes (512 FP8 c_kv + 4 fp32 tile scales + 64 bf16 RoPE) and 128 FP8
    # indexer bytes (+ the 4-byte fp32 scale the layout adds per token) = 788 B per token and layer.
    return dict(num_layers=61, block_size=BLOCK, latent_dim=656, latent_dtype=torch.uint8, index_dim=128,
                index_dtype=torch.uint8)


def _fill(storage: PagedKVStorage) -> None:
    """Block b holds the byte (7b + 1) % 256 everywhere but its first 8 bytes, which hold b (int64)."""
    n = storage.num_blocks
    storage.buffer[:] = ((torch.arange(n) * 7 + 1) % 256).to(torch.uint8)[:, None]
    storage.buffer[:, :8] = torch.arange(n, dtype=torch.int64)[:, None].view(torch.uint8)


def _check(dst: PagedKVStorage, dst_blocks: list[int], src_blocks: list[int]) -> None:
    got = dst.buffer[torch.tensor(dst_blocks)]
    want = ((torch.tensor(src_blocks) * 7 + 1) % 256).to(torch.uint8)
    assert bool((got[:, 8:] == want[:, None]).all()), "NIXL READ delivered wrong bytes"
    assert got[:, :8].contiguous().view(torch.int64).flatten().tolist() == src_blocks, "blocks out of order"


def _holder_main(conn) -> None:
    """Child process: serves one NixlHolder at a time over ``conn``."""
    from kvstore.nixl_transfer import NixlHolder

    holder = storage = None
    while True:
        msg = conn.recv()
        if holder is not None:
            holder.close()
            holder = storage = None
            gc.collect()
        if msg == "stop":
            return
        _, layout_kw, num_blocks, huge = msg
        storage = PagedKVStorage(BlockLayout(**layout_kw), num_blocks)
        _fill(storage)
        holder = NixlHolder(f"bench-holder-{uuid.uuid4().hex[:8]}", storage, huge_pages=huge)
        conn.send(holder.endpoint())


def _handle(endpoint: dict, block_ids: list[int], request_id: str):
    from workers.engine.types import KVHandle, LayoutFingerprint

    fp = LayoutFingerprint("bench", "-", "-", BLOCK, 1, 0, endpoint.get("bytes_per_block", 0))
    return KVHandle(worker_id="bench-holder", request_id=request_id, block_ids=tuple(block_ids), num_tokens=BLOCK * len(block_ids),
                    first_token=0, fingerprint=fp, lease_expires_at=time.time() + 600, endpoint=endpoint)


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(conn, reader, layout_kw: dict, n: int, reps: int, inner: int, huge: bool) -> dict[str, list[float]]:
    """Seconds per repetition of each way to move n blocks: NIXL READ with shuffled block ids, NIXL
    READ of one run of blocks, copy_ (warm), clone. Each of ``reps`` rounds (after a warm-up round)
    waits for a quiet machine, then times every way ``inner`` times, so load drifts hit all alike."""
    conn.send(("nixl", layout_kw, n, huge))
    endpoint = conn.recv()
    dst = PagedKVStorage(BlockLayout(**layout_kw), n)
    rng = random.Random(n)
    shuffled = (rng.sample(range(n), n), rng.sample(range(n), n))
    one_run = (list(range(n)), list(range(n)))
    src = dst.buffer.view(-1)  # memcpy reads the same bytes the READ just wrote
    out = torch.empty_like(src).zero_()
    if huge:
        advise_huge_pages(out)

    def read(ids):
        reader.read(_handle(endpoint, ids[0], f"bench-{uuid.uuid4().hex[:8]}"), dst, ids[1])

    ways = {"nixl": lambda: read(shuffled), "nixl_run": lambda: read(one_run),
            "copy": lambda: out.copy_(src), "clone": lambda: src.clone()}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for rep in range(reps + 1):  # the first round warms up
        if rep:
            C.wait_quiet(max_wait_s=10.0)
        for key, fn in ways.items():
            for _ in range(inner):
                t = _seconds(fn)
                if rep:
                    times[key].append(t)
            if key.startswith("nixl") and rep in (0, reps):  # verify the bytes (untimed)
                _check(dst, *reversed(shuffled if key == "nixl" else one_run))
    return times


# ---------------------------------------------------------------------------------------------- ray
def ray_available() -> bool:
    root = Path(__file__).resolve().parent.parent
    return importlib.util.find_spec("ray") is not None and (root / "cluster" / "ray_transfer.py").is_file()


class RayBench:
    """The lead's Ray backend between an actor (holder) and this process (reader)."""

    def __init__(self) -> None:
        import ray

        root = str(Path(__file__).resolve().parent.parent)  # the actor imports cluster.ray_transfer from here
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"PYTHONPATH": root}})

        @ray.remote(num_cpus=0.1)
        class Holder:
            def setup(self, layout_kw: dict, n: int) -> None:
                from cluster.ray_transfer import RayHolder

                self.storage = PagedKVStorage(BlockLayout(**layout_kw), n)
                _fill(self.storage)
                self.holder = RayHolder(self.storage)

            def endpoint(self, block_ids: list[int], request_id: str) -> dict:
                return self.holder.endpoint(block_ids, request_id)

        from cluster.ray_transfer import RayTransfer

        self.ray, self.actor, self.reader = ray, Holder.remote(), RayTransfer(timeout_s=120.0)

    def times(self, layout_kw: dict, n: int, reps: int) -> list[float]:
        """Seconds from asking the holder for a handle (its put) to the bytes in the reader's blocks."""
        self.ray.get(self.actor.setup.remote(layout_kw, n))
        dst = PagedKVStorage(BlockLayout(**layout_kw), n)
        rng = random.Random(n)
        src_ids, dst_ids = rng.sample(range(n), n), rng.sample(range(n), n)

        def one():
            endpoint = self.ray.get(self.actor.endpoint.remote(src_ids, "ray-bench"))
            self.reader.read(_handle(endpoint, src_ids, "ray-bench"), dst, dst_ids)

        times = C.timed(one, reps)
        _check(dst, dst_ids, src_ids)
        return times

    def close(self) -> None:
        self.ray.shutdown()


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--no-ray", action="store_true", help="skip the Ray column"),
        p.add_argument("--no-huge-pages", action="store_true", help="plain 4 KiB pages for every buffer"),
    ))
    C.setup_threads(args.threads, engine_on_main_thread=True)
    reps = args.reps or (3 if args.quick else 5)
    cases = [("tiny preset (fp32)", tiny_layout(), 4096), ("tiny preset (fp32)", tiny_layout(), 32768),
             ("671B (FP8 latent + indexer)", v32_layout(), 4096), ("671B (FP8 latent + indexer)", v32_layout(), 32768)]
    if args.quick:
        cases = cases[:3]
    C.print_header("KV transfer between two processes: NIXL READ vs memcpy")

    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_holder_main, args=(child,), daemon=True)
    proc.start()
    reader = NixlTransfer(f"bench-reader-{uuid.uuid4().hex[:8]}", timeout_s=120.0, huge_pages=not args.no_huge_pages)
    ray_bench = RayBench() if ray_available() and not args.no_ray else None
    rows, verdicts = [], []
    try:
        for label, layout_kw, tokens in cases:
            layout = BlockLayout(**layout_kw)
            n = -(-tokens // BLOCK)
            nbytes = n * layout.bytes_per_block
            inner = 10 if nbytes < 2**26 else 1  # small copies take ms: more samples against noise
            t = measure(conn, reader, layout_kw, n, reps, inner, not args.no_huge_pages)
            scattered, one_run, copy, clone = t["nixl"], t["nixl_run"], t["copy"], t["clone"]
            gc.collect()  # this case's buffers go before the next case's arrive
            ray_t = ray_bench.times(layout_kw, n, reps) if ray_bench else None
            gbps = lambda ts: nbytes / C.median(ts) / 1e9  # noqa: E731
            ratio, ratio_clone = gbps(scattered) / gbps(copy), gbps(scattered) / gbps(clone)
            rows.append([label, f"{tokens // 1024}K", n, f"{layout.bytes_per_block:,}", f"{nbytes / 2**20:.1f}",
                         f"{gbps(scattered):.2f}", f"{gbps(one_run):.2f}", f"{gbps(copy):.2f}", f"{gbps(clone):.2f}",
                         f"{100 * ratio:.0f} %", f"{100 * ratio_clone:.0f} %", "n/a" if ray_t is None else f"{gbps(ray_t):.2f}",
                         f"{1e3 * C.median(scattered):.1f}"])
            if tokens == 32768:
                verdicts.append(f"{label}: {'MET' if ratio >= GOAL else 'MISSED'} against copy_ into a warm buffer "
                                f"({100 * ratio:.0f} %); {'MET' if ratio_clone >= GOAL else 'MISSED'} against clone "
                                f"({100 * ratio_clone:.0f} %)")
    finally:
        conn.send("stop")
        proc.join(30)
        reader.close()
        if ray_bench:
            ray_bench.close()
    print(C.markdown_table(
        ["KV layout", "prompt", "blocks", "bytes/block", "MiB", "NIXL GB/s (shuffled blocks)", "NIXL GB/s (one run)",
         "memcpy GB/s (copy_)", "clone GB/s", "NIXL / copy_", "NIXL / clone", "ray GB/s", "NIXL ms"], rows))
    print(f"\nMedians of {reps} rounds (× 10 repetitions below 64 MiB) after a warm-up round, each round started "
          f"when the CPUs were ≥ 80 % idle or after 10 s; ray: {reps} repetitions; GB = 1e9 bytes; "
          f"NIXL stats: {reader.stats()}")
    print(f"\nGoal (from the issue): NIXL ≥ {100 * GOAL:.0f} % of memcpy for the 32K prompt's KV")
    for v in verdicts:
        print(f"- {v}")
    print("(NIXL = the shuffled-block READ, the engine's worst case: one descriptor per block.)")
    C.print_footer()


if __name__ == "__main__":
    main()
