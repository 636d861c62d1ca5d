"""Expert parallelism: all-to-all cost per MoE layer, and expert-load balance before/after rebalancing.

    .venv/bin/python -m bench.ep [--quick] [--reps N]

1. **All-to-all per MoE layer** (gloo over loopback, CPU). ``ep`` spawned processes form a group with
   DeepSeek-V3.2's MoE shape (hidden 7168 in bf16, 256 routed experts, 8 per token, contiguous
   placement) and identity experts, so the time is the exchange itself: header + dispatch + combine
   all-to-alls and the sort/unsort around them (``ExpertParallelMoE.routed``). Two origins:
   ``rank 0`` (the serving setup: rank 0 runs the engine, the others serve experts) and ``all ranks``
   (data-parallel attention: every rank brings its own tokens). Uniform random routing. Bytes = payload
   sent to *other* ranks by all ranks (a rank's rows for itself are a local copy).
2. **Load balance** (no processes): a synthetic Zipf-skewed router (expert popularity ∝ 1/rank^s, a
   different expert order per layer, 8 distinct experts per token) writes a history trace; plans are
   built from its per-expert counts (``ExpertLoad.counts()`` shape) and judged on a *fresh* trace from
   the same router, with the real token split among replicas (``LayerPlacement.route``). Reported:
   per-rank tokens max/mean, worst layer. Goal: rebalanced ≤ 1.2.
"""

from __future__ import annotations

import socket
import statistics
import time

import torch
import torch.multiprocessing as mp
from torch import nn

from bench import common as C

DIM, EXPERTS, TOPK = 7168, 256, 8  # DeepSeek-V3.2


# ---------------------------------------------------------------------------------------------- all-to-all
def _rank(rank: int, size: int, port: int, tokens: list[int], origin: str, reps: int, out) -> None:
    import torch.distributed as dist

    from workers.parallel import EPGroup, ExpertParallel, ExpertPlacement

    torch.set_num_threads(1)
    group = EPGroup.init(rank, size, "127.0.0.1", port, timeout_s=120)
    placement = ExpertPlacement.contiguous(EXPERTS, size)
    ep = ExpertParallel(placement, group, dim=DIM, dtype=torch.bfloat16)
    epm = ep.add_layer(0, {e: nn.Identity() for e in placement.default.rank_experts[rank]})
    gen = torch.Generator().manual_seed(rank)
    results = []
    for n in tokens:
        mine = n if origin == "all ranks" or rank == 0 else 0
        x = torch.randn(mine, DIM, generator=gen).to(torch.bfloat16)
        ids = torch.rand(mine, EXPERTS, generator=gen).topk(TOPK, dim=1).indices
        w = torch.rand(mine, TOPK, generator=gen)
        times, sent = [], []
        for i in range(reps + 1):
            dist.barrier()
            before = group.traffic.bytes_sent
            start = time.perf_counter()
            epm.routed(x, w, ids)
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - start)
                sent.append(group.traffic.bytes_sent - before)
        results.append((n, statistics.median(times), statistics.median(sent)))
    out.put((rank, results))
    dist.barrier()
    group.close()


def all_to_all_rows(ep_sizes: list[int], tokens: list[int], reps: int) -> list[list[object]]:
    rows = []
    ctx = mp.get_context("spawn")
    for size in ep_sizes:
        for origin in ("rank 0", "all ranks"):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            queue = ctx.Queue()
            procs = [ctx.Process(target=_rank, args=(r, size, port, tokens, origin, reps, queue)) for r in range(size)]
            for p in procs:
                p.start()
            by_rank = {}
            while len(by_rank) < size:
                try:
                    rank, result = queue.get(timeout=1.0)
                    by_rank[rank] = result
                except Exception:  # queue.Empty: is every rank still alive?
                    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        for p in procs:
                            p.kill()
                        raise RuntimeError(f"an ep {size} rank failed (exit codes {dead})") from None
            for p in procs:
                p.join(60)
            for i, n in enumerate(tokens):
                seconds = max(by_rank[r][i][1] for r in by_rank)  # the layer ends when the slowest rank has its rows
                sent = sum(by_rank[r][i][2] for r in by_rank)
                rows.append([size, origin, n, f"{n * TOPK * DIM * 2 / 2**20:.1f}", f"{sent / 2**20:.1f}",
                             f"{seconds * 1e3:.2f}", f"{sent / seconds / 1e9:.2f}"])
    return rows


# ---------------------------------------------------------------------------------------------- balance
def zipf_router(s: float, layer: int) -> torch.Tensor:
    """Expert selection probabilities [E]: popularity ∝ 1/rank^s, experts shuffled per layer."""
    weights = 1.0 / torch.arange(1, EXPERTS + 1, dtype=torch.float64) ** s
    perm = torch.randperm(EXPERTS, generator=torch.Generator().manual_seed(1000 + layer))
    return (weights / weights.sum())[perm.argsort()]


def trace(probs: torch.Tensor, tokens: int, seed: int) -> torch.Tensor:
    """Long [tokens, k]: k distinct experts per token drawn from ``probs``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(probs.expand(tokens, -1), TOPK, replacement=False, generator=gen)


def max_over_mean(plan, ids: torch.Tensor) -> float:
    rank, _ = plan.route(ids)
    load = torch.bincount(rank, minlength=plan.ep_size).double()
    return float(load.max() / load.mean())


def balance_rows(skews: list[float], ep_sizes: list[int], layers: int, tokens: int) -> list[list[object]]:
    from workers.parallel import ExpertPlacement

    rows = []
    for s in skews:
        probs = {layer: zipf_router(s, layer) for layer in range(layers)}
        history = {layer: torch.bincount(trace(p, tokens, seed=layer).flatten(), minlength=EXPERTS) for layer, p in probs.items()}
        fresh = {layer: trace(p, tokens, seed=10_000 + layer) for layer, p in probs.items()}
        hottest = max(float(h.max()) / float(h.sum() / EXPERTS) for h in history.values())
        for ep in ep_sizes:
            plans = {
                "contiguous": ExpertPlacement.contiguous(EXPERTS, ep),
                "balanced": ExpertPlacement.balanced(history, EXPERTS, ep),
                f"balanced + {ep} redundant": ExpertPlacement.balanced(history, EXPERTS, ep, redundant=ep),
            }
            worst = {name: max(max_over_mean(plan.layer(layer), fresh[layer]) for layer in fresh) for name, plan in plans.items()}
            rows.append([s, f"{hottest:.1f}", ep, *(f"{v:.2f}" for v in worst.values())])
    return rows


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0])
    reps = args.reps or (3 if args.quick else 10)
    C.print_header("Expert parallelism: all-to-all per MoE layer, load balance")
    ep_sizes = [2] if args.quick else [2, 4]
    tokens = [16, 128] if args.quick else [16, 64, 256, 512]
    print(f"### All-to-all per MoE layer (gloo, loopback; hidden {DIM} bf16, {EXPERTS} experts, top-{TOPK}, "
          f"identity experts; median of {reps})\n")
    print(C.markdown_table(
        ["ep", "tokens from", "tokens per origin", "payload per origin (MiB)", "sent to other ranks, all ranks (MiB)",
         "time per layer (ms)", "GB/s"],
        all_to_all_rows(ep_sizes, tokens, reps)))
    layers, n = (2, 4096) if args.quick else (8, 16384)
    skews = [1.0] if args.quick else [0.6, 1.0, 1.2]
    eps = [8, 32] if args.quick else [8, 16, 32, 64]
    print(f"\n### Per-rank expert load, max/mean (worst of {layers} layers; {EXPERTS} experts, top-{TOPK}, Zipf-skewed "
          f"routing; plan from a {n}-token history, judged on a fresh {n}-token trace)\n")
    print(C.markdown_table(
        ["Zipf s", "hottest expert / mean", "ep", "contiguous", "balanced, no redundancy", "balanced + ep redundant"],
        balance_rows(skews, eps, layers, n)))
    print(f"\nload average at end: {C.load_average()}")


if __name__ == "__main__":
    main()
