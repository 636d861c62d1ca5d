"""DSA kernels of one DeepSeek-V3.2-width layer on the GPU: achieved TFLOP/s and GB/s vs the GPU's peak.

    python -m bench.gpu [--quick] [--contexts 8192,32768,131072] [--batches 1,8,32,64] [--chunk 4096]

Random weights and cache contents at V3.2's widths (64 index heads × 128 with FP8 keys, top-k 2048,
latent 512 + 64 rope in bf16, 128 heads, block size 64), in our paged layout (``PagedKVStorage``, one
layer). Per context:
- indexer decode: ``batch`` sequences, one query each, logits over all their paged keys (Triton), then
  top-k (torch, timed apart);
- indexer prefill: the last ``chunk`` queries of one sequence, causal;
- sparse MLA decode: ``batch`` queries, 2048 selected latents each (split-K);
- sparse MLA prefill: ``chunk`` queries, 2048 selected latents each.
FLOPs: 2 per multiply-add (indexer: Hi·D per visible key; MLA: H·(2r + p) per selected key). Bytes: what
the kernel must read or write at least — index keys + scales and logits; each query's selected latents.
Peaks: the datasheet's dense bf16 TFLOP/s and HBM GB/s where the GPU is known, else measured (a bf16
GEMM and a copy). Beside ours, when their packages import: FlashMLA's sparse prefill kernel (also run on
the decode rows, as vLLM does in its mixed mode) and DeepGEMM's FP8 MQA logits (prefill) and paged
MQA logits (decode). Exits with a message where no CUDA device exists.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
from collections.abc import Callable

import torch

HI, D, TOPK, RANK, ROPE, H, BS = 64, 128, 2048, 512, 64, 128, 64
SCALE = 192**-0.5 * 1.873854
DEVICE = "cuda"
# Datasheet dense (no sparsity) bf16 TFLOP/s and HBM GB/s, SXM parts.
PEAKS = {"H200": (989.0, 4800.0), "H100": (989.0, 3350.0), "H800": (989.0, 3350.0), "H20": (148.0, 4000.0),
         "A100": (312.0, 2039.0), "B200": (2250.0, 8000.0)}


def timed(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs (CUDA events), after two warm-up runs."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def peaks(reps: int) -> tuple[float, float, str]:
    """(TFLOP/s, GB/s, source) of this GPU."""
    name = torch.cuda.get_device_name()
    for key, (tf, gb) in PEAKS.items():
        if key in name:
            return tf, gb, f"datasheet {key}"
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    tf = 2 * 8192**3 / timed(lambda: a @ a, reps) / 1e12
    src, dst = torch.empty(1 << 28, device=DEVICE), torch.empty(1 << 28, device=DEVICE)
    gb = 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), reps) / 1e9
    return tf, gb, "measured"


def peer(name: str):
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any failure means "not available here"
        print(f"  {name}: not importable ({type(e).__name__}: {e})")
        return None


class Layer:
    """One layer's paged cache holding ``seqs`` sequences of ``ctx`` tokens, with random contents."""

    def __init__(self, seqs: int, ctx: int, gen: torch.Generator) -> None:
        from kvstore.paged import BlockLayout, PagedKVStorage
        from workers.model.indexer import ue8m0_quantize

        per = -(-ctx // BS)
        layout = BlockLayout(1, BS, RANK + ROPE, torch.bfloat16, D, torch.float8_e4m3fn)
        self.storage = PagedKVStorage(layout, seqs * per, device=DEVICE)
        self.latent, self.index_k, self.index_scale = (
            self.storage.latent(0), self.storage.index_k(0), self.storage.index_scale(0))
        self.latent.copy_(torch.randn(self.latent.shape, device=DEVICE, dtype=torch.bfloat16))
        k8, ks = ue8m0_quantize(torch.randn(self.index_k.shape, device=DEVICE, dtype=torch.bfloat16))
        self.index_k.copy_(k8)
        self.index_scale.copy_(ks)
        self.tables = torch.randperm(seqs * per, generator=gen).view(seqs, per).to(DEVICE)
        self.ctx = ctx


def report(label: str, seconds: float, flops: float, nbytes: float, peak: tuple[float, float, str]) -> None:
    tf, gb = flops / seconds / 1e12, nbytes / seconds / 1e9
    print(f"  {label:<44} {seconds * 1e3:9.3f} ms {tf:8.1f} TFLOP/s ({100 * tf / peak[0]:5.1f}%) "
          f"{gb:8.0f} GB/s ({100 * gb / peak[1]:5.1f}%)")


def queries(rows: int, gen: torch.Generator):
    from workers.model.indexer import ue8m0_quantize

    q8, qs = ue8m0_quantize(torch.randn(rows, HI, D, generator=gen).to(DEVICE))
    w = torch.randn(rows, HI, generator=gen).to(DEVICE) * (HI**-0.5 * D**-0.5)
    q_lat = torch.randn(rows, H, RANK, generator=gen).to(DEVICE).bfloat16()
    q_pe = torch.randn(rows, H, ROPE, generator=gen).to(DEVICE).bfloat16()
    return q8, qs, w, q_lat, q_pe


def bench_context(ctx: int, batches: list[int], chunk: int, reps: int, pk, gen: torch.Generator, peers: dict) -> None:
    from workers.kernels.indexer import paged_index_logits, select_from_logits
    from workers.kernels.sparse_mla import sparse_mla_decode, sparse_mla_flops, sparse_mla_prefill

    print(f"context {ctx}")
    layer = Layer(max(batches), ctx, gen)
    k = min(TOPK, ctx)
    for b in batches:
        q8, qs, w, q_lat, q_pe = queries(b, gen)
        q = q8.float() * qs[..., None]
        tables = layer.tables[:b]
        q_pos = torch.full((b,), ctx - 1, device=DEVICE)
        rows = torch.arange(b, device=DEVICE)
        run = lambda: paged_index_logits(q, w, layer.index_k, layer.index_scale, tables, rows, q_pos, ctx)  # noqa: E731
        report(f"indexer decode   b={b:<3} (Triton)", timed(run, reps), 2 * b * HI * D * ctx, b * ctx * (D + 4 + 4), pk)
        logits = run()
        run = lambda: select_from_logits(logits, q_pos, k)  # noqa: E731
        report(f"indexer top-k    b={b:<3} (torch)", timed(run, reps), 0, b * ctx * 4, pk)
        idx = torch.stack([torch.randperm(ctx, generator=gen)[:k] for _ in range(b)]).to(DEVICE)
        valid = torch.ones_like(idx, dtype=torch.bool)
        run = lambda: sparse_mla_decode(q_lat, q_pe, layer.latent, tables, idx, valid, SCALE)  # noqa: E731
        report(f"sparse MLA decode b={b:<3} (Triton)", timed(run, reps), sparse_mla_flops(b, H, k, RANK, ROPE),
               b * k * (RANK + ROPE) * 2, pk)
        _peer_decode(peers, layer, b, q8, qs, w, q_lat, q_pe, tables, idx, reps, pk)
    n = min(chunk, ctx)
    q8, qs, w, q_lat, q_pe = queries(n, gen)
    q = q8.float() * qs[..., None]
    table = layer.tables[0]
    q_pos = torch.arange(ctx - n, ctx, device=DEVICE)
    zeros = torch.zeros(n, dtype=torch.long, device=DEVICE)
    visible = n * (ctx - n) + n * (n + 1) // 2
    run = lambda: paged_index_logits(  # noqa: E731
        q, w, layer.index_k, layer.index_scale, table[None], zeros, q_pos, ctx)
    logit_bytes = ctx * (D + 4) + n * ctx * 4
    report(f"indexer prefill  n={n:<5} (Triton)", timed(run, reps), 2 * HI * D * visible, logit_bytes, pk)
    if ctx - n + 1 < k:
        print("  sparse MLA prefill: the chunk's first query sees fewer than top-k keys; skipped")
        return
    idx = torch.stack([torch.randperm(ctx - n + i + 1, generator=gen)[:k] for i in range(n)]).to(DEVICE)
    valid = torch.ones_like(idx, dtype=torch.bool)
    run = lambda: sparse_mla_prefill(q_lat, q_pe, layer.latent, table, idx, valid, SCALE)  # noqa: E731
    report(f"sparse MLA prefill n={n:<5} (Triton)", timed(run, reps), sparse_mla_flops(n, H, k, RANK, ROPE),
           n * k * (RANK + ROPE) * 2, pk)
    _peer_prefill(peers, layer, n, q8, qs, w, q_lat, q_pe, table, idx, q_pos, reps, pk)


def _slots(tables: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return (tables.gather(1, idx // BS) * BS + idx % BS).to(torch.int32)


def _flash_mla_sparse(fm, layer: Layer, q_lat, q_pe, tables, idx, reps, pk, label: str) -> None:
    from workers.kernels.sparse_mla import sparse_mla_flops

    kv = layer.latent.reshape(-1, 1, RANK + ROPE).contiguous()  # its input: one contiguous bf16 latent array
    q = torch.cat((q_lat, q_pe), dim=-1).contiguous()
    ind = _slots(tables, idx)[:, None].contiguous()
    try:
        run = lambda: fm.flash_mla_sparse_fwd(q, kv, ind, SCALE, RANK)  # noqa: E731
        report(label, timed(run, reps), sparse_mla_flops(q.shape[0], H, idx.shape[1], RANK, ROPE),
               idx.numel() * (RANK + ROPE) * 2, pk)
    except Exception as e:  # noqa: BLE001 - a peer's API drift must not stop the benchmark
        print(f"  {label}: failed ({type(e).__name__}: {e})")


def _peer_decode(peers, layer, b, q8, qs, w, q_lat, q_pe, tables, idx, reps, pk) -> None:
    if peers.get("flash_mla"):
        _flash_mla_sparse(peers["flash_mla"], layer, q_lat, q_pe, tables, idx, reps, pk,
                          f"sparse MLA decode b={b:<3} (FlashMLA sparse fwd)")
    dg = peers.get("deep_gemm")
    if dg:
        label = f"indexer decode   b={b:<3} (DeepGEMM paged)"
        try:
            nb = layer.index_k.shape[0]
            fused = torch.cat((layer.index_k.reshape(nb, -1).view(torch.uint8),
                               layer.index_scale.reshape(nb, -1).view(torch.uint8)), dim=1).view(nb, BS, 1, D + 4)
            lens = torch.full((b,), layer.ctx, dtype=torch.int32, device=DEVICE)
            meta = dg.get_paged_mqa_logits_metadata(lens, BS, torch.cuda.get_device_properties(0).multi_processor_count)
            qf = (q8.float() * qs[..., None]).to(torch.float8_e4m3fn)[:, None]  # scales are powers of two: exact
            t32 = tables.to(torch.int32)
            run = lambda: dg.fp8_paged_mqa_logits(qf, fused, w, lens, t32, meta, layer.ctx, False)  # noqa: E731
            report(label, timed(run, reps), 2 * b * HI * D * layer.ctx, b * layer.ctx * (D + 8), pk)
        except Exception as e:  # noqa: BLE001
            print(f"  {label}: failed ({type(e).__name__}: {e})")


def _peer_prefill(peers, layer, n, q8, qs, w, q_lat, q_pe, table, idx, q_pos, reps, pk) -> None:
    if peers.get("flash_mla"):
        _flash_mla_sparse(peers["flash_mla"], layer, q_lat, q_pe, table[None].expand(n, -1), idx, reps, pk,
                          f"sparse MLA prefill n={n:<5} (FlashMLA)")
    dg = peers.get("deep_gemm")
    if dg:
        label = f"indexer prefill  n={n:<5} (DeepGEMM)"
        try:
            ctx = layer.ctx
            k8 = layer.index_k[table].reshape(-1, D)[:ctx].contiguous()
            ks = layer.index_scale[table].reshape(-1)[:ctx].contiguous()
            qf = (q8.float() * qs[..., None]).to(torch.float8_e4m3fn)
            start = torch.zeros(n, dtype=torch.int32, device=DEVICE)
            end = (q_pos + 1).to(torch.int32)
            run = lambda: dg.fp8_mqa_logits(qf, (k8, ks), w, start, end)  # noqa: E731
            visible = n * (ctx - n) + n * (n + 1) // 2
            report(label, timed(run, reps), 2 * HI * D * visible, ctx * (D + 4) + n * ctx * 4, pk)
        except Exception as e:  # noqa: BLE001
            print(f"  {label}: failed ({type(e).__name__}: {e})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one small context and batch: a smoke run")
    p.add_argument("--contexts", default="8192,32768,131072")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--chunk", type=int, default=4096, help="prefill queries per chunk")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.gpu: no CUDA device on this machine; this benchmark runs only where a GPU exists.")
    if importlib.util.find_spec("triton") is None:
        sys.exit("bench.gpu: triton is not installed (pip install triton).")
    contexts = [8192] if args.quick else [int(c) for c in args.contexts.split(",")]
    batches = [1, 8] if args.quick else [int(b) for b in args.batches.split(",")]
    chunk = 1024 if args.quick else args.chunk
    pk = peaks(args.reps)
    print(f"{torch.cuda.get_device_name()}: peak {pk[0]:.0f} TFLOP/s bf16, {pk[1]:.0f} GB/s ({pk[2]})")
    print("peers:")
    peers = {name: peer(name) for name in ("flash_mla", "deep_gemm", "sgl_kernel")}
    for name, mod in peers.items():
        if mod is not None:
            note = " (not called: its DSA kernels are FlashMLA's)" if name == "sgl_kernel" else ""
            print(f"  {name}: imported{note}")
    print("  (FlashMLA's FP8 sparse decode needs its 656-byte cache format: not run)")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for ctx in contexts:
            bench_context(ctx, batches, chunk, args.reps, pk, gen, peers)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
