"""Long contexts (8K / 32K / 128K): chunked prefill time, the indexer's share, peak RSS, decode ms/token.

    .venv/bin/python -m bench.long_context [--quick] [--contexts 8192,32768,131000] [--chunk 4096]
        [--new-tokens 8] [--dtype auto|float32|bfloat16] [--preset tiny-128k]

Model: the ``tiny-128k`` preset (tiny's widths, V3.2's ``index_topk`` 2048, 163840 positions, YaRN
factor 40), a random checkpoint cached under the bench cache. One ``Engine`` per context, stepped in
this thread (no event loop, no backend), sized for exactly that request: ``ceil((L + new + 1) / 64)``
blocks of 64, ``max_num_batched_tokens`` = ``--chunk``, ``max_model_len`` = L + new + 1. One request of
L random prompt tokens asks for ``new + 1`` tokens (greedy, EOS ignored): the first comes from the
prefill, the next ``new`` are decode steps.

Measured per context:
- **prefill**: from ``add_request`` to the first token (every chunk of the prompt);
- **indexer**: cumulative wall time inside ``Indexer.select`` (scoring + top-k, all slabs),
  ``Indexer.queries`` and ``Indexer.keys`` during the prefill, by wrappers that add two clock reads
  per call (a few calls per layer and chunk). Its analytic FLOPs: the q·k scores of every causal
  (query, key) pair the indexer sees — chunks whose context exceeds ``index_topk`` — times
  ``index_n_heads · index_head_dim · 2 · layers``; achieved GFLOP/s = those FLOPs / select time;
- **decode**: gaps between successive tokens after the first (median, min–max);
- **peak RSS**: a thread samples ``VmRSS`` of /proc/self/status every ``--sample-ms`` ms from before
  the engine is built (so the KV cache counts) until the request ends; also ``VmHWM`` after resetting
  it through /proc/self/clear_refs where the kernel allows. Reported as the increase over the RSS
  just before the engine was built, next to the KV cache's own size.

Goal (issue: 128K contexts): a 128K prompt (≥ 131,000 tokens) prefills and decodes its ``new``
tokens in ≤ 240 s. ``--quick`` (contexts 2048, 8192) prints only a rough extrapolation.
"""

from __future__ import annotations

import argparse
import gc
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import common as C

PRESET = "tiny-128k"
CONTEXTS = (8192, 32768, 131000)
QUICK_CONTEXTS = (2048, 8192)
GOAL_CONTEXT = 131000  # "128K" in the issue
GOAL_S = 240.0


# ---------------------------------------------------------------------------------------------- memory
def _status_kib(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), in KiB; None where unreadable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak RSS (VmHWM) to the current RSS: ``echo 5 > /proc/self/clear_refs``."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Peak resident set size between ``start`` and ``stop``: the max of ``VmRSS`` sampled every
    ``interval_s`` and (where it could be reset at start) the kernel's own ``VmHWM``."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.base_kib = self.peak_kib = 0
        self.hwm_reset = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "RssSampler":
        gc.collect()
        self.base_kib = self.peak_kib = _status_kib("VmRSS") or 0
        self.hwm_reset = _reset_hwm()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_kib = max(self.peak_kib, _status_kib("VmRSS") or 0)

    def stop(self) -> int:
        """→ peak RSS in KiB."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_kib = max(self.peak_kib, _status_kib("VmRSS") or 0)
        if self.hwm_reset:
            self.peak_kib = max(self.peak_kib, _status_kib("VmHWM") or 0)
        return self.peak_kib

    @property
    def grew_mib(self) -> float:
        return (self.peak_kib - self.base_kib) / 1024


# ---------------------------------------------------------------------------------------------- indexer timer
class IndexerTimer:
    """Cumulative wall seconds and calls of ``Indexer.select`` / ``queries`` / ``keys`` (wrapped on the
    class, so every MLA layer and both attention paths are counted). ``install``/``uninstall``."""

    NAMES = ("select", "queries", "keys")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.NAMES, 0.0)
        self.calls = dict.fromkeys(self.NAMES, 0)
        self._saved: dict[str, object] = {}

    def install(self) -> "IndexerTimer":
        from workers.model.indexer import Indexer

        for name in self.NAMES:
            raw = Indexer.__dict__[name]
            self._saved[name] = raw
            is_static = isinstance(raw, staticmethod)
            fn = raw.__func__ if is_static else raw

            def wrap(fn=fn, name=name):
                def timed(*a, **k):
                    t0 = time.perf_counter()
                    try:
                        return fn(*a, **k)
                    finally:
                        self.seconds[name] += time.perf_counter() - t0
                        self.calls[name] += 1
                timed.__wrapped__ = fn
                timed.__doc__ = fn.__doc__
                return timed

            setattr(Indexer, name, staticmethod(wrap()) if is_static else wrap())
        return self

    def uninstall(self) -> None:
        from workers.model.indexer import Indexer

        for name, raw in self._saved.items():
            setattr(Indexer, name, raw)
        self._saved.clear()

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)


def indexer_pairs(n: int, chunk: int, topk: int) -> int:
    """Causal (query, key) pairs the indexer scores when ``n`` prompt tokens prefill in chunks of
    ``chunk`` from position 0: in a chunk ending at context ``ctx`` > ``topk`` the query at position
    t sees t + 1 keys; chunks with ``ctx`` ≤ ``topk`` are dense attention and skip the indexer."""
    pairs = 0
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        if hi > topk:
            pairs += (lo + 1 + hi) * (hi - lo) // 2  # sum of (t + 1) for t in [lo, hi)
    return pairs


def indexer_flops(config, n: int, chunk: int) -> float:
    """q·k FLOPs of the prefill's indexer: pairs × index_n_heads × index_head_dim × 2 × layers (the
    ReLU, the head-weighted sum — 1/index_head_dim more — and top-k are not counted)."""
    pairs = indexer_pairs(n, chunk, config.index_topk)
    return pairs * config.index_n_heads * config.index_head_dim * 2 * config.num_hidden_layers


# ---------------------------------------------------------------------------------------------- one run
@dataclass
class Result:
    context: int
    prefill_s: float
    chunks: int
    decode_s: list[float]
    indexer_s: dict[str, float]  # during the prefill
    decode_indexer_s: float  # select + queries + keys during the decode steps
    rss_base_mib: float
    rss_grew_mib: float
    kv_mib: float
    hwm_reset: bool
    tokens: list[int] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return self.prefill_s + sum(self.decode_s)


def run_context(model, n: int, args, timer: IndexerTimer, seed: int) -> Result:
    from workers.engine.config import EngineConfig
    from workers.engine.engine import Engine
    from workers.engine.types import GenerateRequest, SamplingParams

    max_tokens = args.new_tokens + 1
    block = 64
    cfg = EngineConfig(
        num_blocks=-(-(n + max_tokens) // block) + 1, block_size=block, max_num_seqs=1,
        max_num_batched_tokens=args.chunk, max_model_len=n + max_tokens,
    )
    ids = tuple(C.random_ids(n, seed=seed))
    C.wait_quiet()
    sampler = RssSampler(args.sample_ms / 1e3).start()
    engine = Engine(model, cfg, model_id=f"long-{n}")
    kv_mib = cfg.num_blocks * engine.layout.bytes_per_block / 2**20
    stamps: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []

    def sink(out) -> None:
        now = time.perf_counter()
        if getattr(out, "error", None):
            errors.append(out.error)
            return
        for t in out.new_token_ids:
            stamps.append(now)
            tokens.append(t)

    before = timer.snapshot()
    t0 = time.perf_counter()
    engine.add_request(GenerateRequest(f"long-{n}", ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True)), sink)
    steps = prefill_steps = 0
    at_first: dict[str, float] | None = None
    while engine.has_work():
        engine.step()
        steps += 1
        if at_first is None:
            prefill_steps = steps
            if stamps:
                at_first = timer.snapshot()
    sampler.stop()
    del engine
    gc.collect()
    if errors:
        raise RuntimeError(f"context {n}: {errors[0]}")
    if len(stamps) != max_tokens:
        raise RuntimeError(f"context {n}: got {len(stamps)} tokens, expected {max_tokens}")
    end = timer.snapshot()
    at_first = at_first or end
    return Result(
        context=n, prefill_s=stamps[0] - t0, chunks=prefill_steps,
        decode_s=[b - a for a, b in zip(stamps, stamps[1:])],
        indexer_s={k: at_first[k] - before[k] for k in before},
        decode_indexer_s=sum(end[k] - at_first[k] for k in end),
        rss_base_mib=sampler.base_kib / 1024, rss_grew_mib=sampler.grew_mib, kv_mib=kv_mib,
        hwm_reset=sampler.hwm_reset, tokens=tokens,
    )


# ---------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"contexts {','.join(map(str, QUICK_CONTEXTS))}: a smoke run")
    p.add_argument("--contexts", default=None,
                   help=f"comma-separated prompt lengths (default {','.join(map(str, CONTEXTS))})")
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk: the engine's max_num_batched_tokens (default 4096)")
    p.add_argument("--new-tokens", type=int, default=8, help="decode steps timed after the first token (default 8)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weights dtype (auto: bfloat16 where the CPU has native bf16, else float32)")
    p.add_argument("--preset", default=PRESET, help=f"model preset (default {PRESET})")
    p.add_argument("--threads", type=int, default=C.THREADS, help="torch intra-op threads")
    p.add_argument("--sample-ms", type=float, default=20.0, help="RSS sampling interval (default 20 ms)")
    p.add_argument("--max-quiet-wait", type=float, default=None,
                   help="seconds to wait for an idle machine before each context (default 45, --quick 2)")
    args = p.parse_args()
    if args.contexts is None:
        args.contexts = ",".join(map(str, QUICK_CONTEXTS if args.quick else CONTEXTS))
    args.context_list = [int(x) for x in args.contexts.split(",") if x.strip()]
    if not args.context_list or min(args.context_list) < 1 or args.chunk < 1 or args.new_tokens < 1:
        p.error("contexts, --chunk and --new-tokens must be positive")
    C.QUIET_MAX_WAIT_S = args.max_quiet_wait if args.max_quiet_wait is not None else (2.0 if args.quick else 45.0)
    return args


def resolve_dtype(name: str) -> torch.dtype:
    try:
        from workers.model.device import resolve_dtype as resolve
    except ImportError:
        return {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[name]
    return resolve(name)


def main() -> None:
    args = parse_args()
    C.setup_threads(args.threads, engine_on_main_thread=True)
    dtype = resolve_dtype(args.dtype)
    C.print_header(f"Long context: chunked prefill and decode at {', '.join(f'{n:,}' for n in args.context_list)} tokens")

    from workers.model import load_model

    config = C.model_config(args.preset)
    need = max(args.context_list) + args.new_tokens + 1
    if need > config.max_position_embeddings:
        raise SystemExit(f"context {max(args.context_list)} + {args.new_tokens + 1} tokens exceeds the preset's "
                         f"max_position_embeddings ({config.max_position_embeddings})")
    path = C.checkpoint(args.preset)
    t0 = time.perf_counter()
    model = load_model(path, dtype=dtype)
    load_s = time.perf_counter() - t0
    rs = config.rope_scaling
    print(f"model: `{args.preset}` ({path}), {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"index_topk {config.index_topk}, indexer {config.index_n_heads}×{config.index_head_dim}, "
          f"max_position_embeddings {config.max_position_embeddings}, YaRN factor {rs.factor if rs else 1} "
          f"over {rs.original_max_position_embeddings if rs else '-'}; dtype {str(dtype).removeprefix('torch.')} "
          f"(--dtype {args.dtype}); loaded in {load_s:.1f} s  ")
    print(f"engine: chunk (max_num_batched_tokens) {args.chunk}, block 64, one sequence, "
          f"{args.new_tokens + 1} tokens per request (1 from the prefill + {args.new_tokens} decode steps)  ")
    peak = C.matmul_gflops_dtype(dtype, n=1024, reps=3)
    peak_gflops = C.median(peak)
    print(f"matmul peak ({str(dtype).removeprefix('torch.')}, 1024³, {args.threads} threads): {peak_gflops:.1f} GFLOP/s\n",
          flush=True)

    timer = IndexerTimer().install()
    try:
        # Warm-up (untimed): one short request over the sparse path (context > index_topk), so lazy
        # initialisation is not charged to the first measured context.
        warm = min(config.index_topk + 256, max(args.context_list))
        run_context(model, warm, argparse.Namespace(**{**vars(args), "new_tokens": 2}), timer, seed=1)
        results = []
        for i, n in enumerate(args.context_list):
            r = run_context(model, n, args, timer, seed=100 + i)
            results.append(r)
            idx = sum(r.indexer_s.values())
            print(f"- {n:,} tokens: prefill {r.prefill_s:.2f} s in {r.chunks} chunk(s) (indexer {idx:.2f} s), "
                  f"decode {1e3 * C.median(r.decode_s):.1f} ms/token, RSS +{r.rss_grew_mib:.0f} MiB", flush=True)
    finally:
        timer.uninstall()

    print("\n### Prefill\n")
    rows = []
    for r in results:
        sel = r.indexer_s["select"]
        idx = sum(r.indexer_s.values())
        fl = indexer_flops(config, r.context, args.chunk)
        model_fl = C.prefill_flops(config, r.context)["total"]
        rows.append([
            f"{r.context:,}", r.chunks, f"{r.prefill_s:.2f}", f"{r.context / r.prefill_s:,.0f}",
            f"{idx:.2f} ({100 * idx / r.prefill_s:.0f} %)", f"{sel:.2f} ({100 * sel / r.prefill_s:.0f} %)",
            f"{fl / 1e12:.3f}", f"{fl / sel / 1e9:.1f}" if sel > 0 else "–",
            f"{fl / (peak_gflops * 1e9):.2f}", f"{model_fl / r.prefill_s / 1e9:.1f}",
        ])
    print(C.markdown_table(
        ["context", "chunks", "prefill s", "tokens/s", "indexer s (share)", "of which select s (share)",
         "indexer q·k TFLOP", "select GFLOP/s", "q·k at matmul peak s", "model GFLOP/s"], rows))
    print("\nindexer = `Indexer.select` (scoring + top-k) + `queries` + `keys`; select GFLOP/s = analytic q·k FLOPs "
          "/ select time (its top-k and masking included). Chunks whose context is ≤ index_topk skip the indexer "
          "(dense attention). model GFLOP/s: `common.prefill_flops` total / prefill time.")

    print("\n### Decode and memory\n")
    rows = []
    for r in results:
        rows.append([
            f"{r.context:,}", C.fmt_times(r.decode_s, 1e-3, 1),
            f"{1e3 * r.decode_indexer_s / len(r.decode_s):.1f}",
            f"{r.rss_base_mib:.0f}", f"{r.rss_grew_mib:.0f}", f"{r.kv_mib:.0f}", f"{r.rss_grew_mib - r.kv_mib:.0f}",
            f"{r.total_s:.2f}",
        ])
    print(C.markdown_table(
        ["context", "decode ms/token (median, min–max)", "indexer ms/token", "RSS before engine MiB",
         "peak RSS increase MiB", "KV cache MiB", "increase − KV MiB", f"prefill + {args.new_tokens} tokens s"], rows))
    hwm = all(r.hwm_reset for r in results)
    print(f"\npeak RSS: VmRSS sampled every {args.sample_ms:g} ms" + (" and VmHWM (reset before each context)" if hwm else
          " (VmHWM could not be reset here)") + "; the increase is over the RSS just before the engine was built.")

    print("\n### Goal\n")
    goal = [r for r in results if r.context >= GOAL_CONTEXT]
    if goal:
        r = max(goal, key=lambda r: r.context)
        ok = r.total_s <= GOAL_S
        print(f"- 128K prefill + {args.new_tokens} decoded tokens ≤ {GOAL_S:.0f} s: {r.context:,} tokens took "
              f"{r.total_s:.1f} s (prefill {r.prefill_s:.1f} s, indexer {sum(r.indexer_s.values()):.1f} s) — "
              f"**{'met' if ok else 'NOT met'}**")
    else:
        # Rough: indexer time ∝ L² (dense scoring), the rest ∝ L (top-k attention, projections, MoE).
        r = max(results, key=lambda r: r.context)
        idx = sum(r.indexer_s.values())
        scale = GOAL_CONTEXT / r.context
        est = idx * scale**2 + (r.prefill_s - idx) * scale + sum(r.decode_s) * scale
        print(f"- 128K prefill + {args.new_tokens} decoded tokens ≤ {GOAL_S:.0f} s: not measured (largest context "
              f"{r.context:,}); rough extrapolation from it (indexer ∝ L², the rest ∝ L): ~{est:.0f} s")
    C.print_footer()


if __name__ == "__main__":
    main()
