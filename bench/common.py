"""Shared helpers of the benchmarks: thread setup, checkpoints, timing, analytic FLOP counts, tables."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

THREADS = 2
DEFAULT_PRESET = "tiny"
SEED = 0


# ---------------------------------------------------------------------------------------------- set-up
ENGINE_THREADS = THREADS


def setup_threads(n: int = THREADS, *, engine_on_main_thread: bool = False) -> int:
    """Same intra-op thread count for every system: dsaserve's engine thread gets ``n`` (its main
    thread keeps one, as in ``dsaserve local``: see workers.host); peers in their own processes get ``n``.
    ``engine_on_main_thread``: the bench steps an Engine itself on the main thread, which then gets ``n``."""
    from workers.host import keep_freed_memory, prepare_serving_process

    global ENGINE_THREADS
    if engine_on_main_thread:
        keep_freed_memory()
        torch.set_num_threads(n)
        ENGINE_THREADS = n
    else:
        ENGINE_THREADS = prepare_serving_process(n)
    return ENGINE_THREADS


def in_thread_profiling() -> None:
    """Profiles step an engine on the main thread: give it the engine's thread count."""
    torch.set_num_threads(ENGINE_THREADS)


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few seconds")
    p.add_argument("--reps", type=int, default=None, help="repetitions per measurement (median reported)")
    p.add_argument("--threads", type=int, default=THREADS, help="torch intra-op threads for both systems")
    p.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary size (default: the real one)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers side")
    p.add_argument("--max-quiet-wait", type=float, default=None,
                   help="seconds to wait for an idle machine before each timed repetition (default 45, --quick 2)")
    if extra is not None:
        extra(p)
    if "--dtype" not in p._option_string_actions:
        p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="weights and activations of both systems (default: float32, the parity dtype)")
    args = p.parse_args()
    global QUIET_MAX_WAIT_S
    QUIET_MAX_WAIT_S = args.max_quiet_wait if args.max_quiet_wait is not None else (2.0 if args.quick else 45.0)
    return args


def command_line() -> str:
    """The exact command that produced this output."""
    module = Path(sys.argv[0]).with_suffix("").name
    return " ".join([".venv/bin/python", "-m", f"bench.{module}", *map(shlex.quote, sys.argv[1:])])


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "nproc": str(os.cpu_count()), "cpu": cpu, "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": str(torch.get_num_threads()),
    }


def load_average() -> str:
    """1/5/15-minute load average: the machine is shared, so say how busy it was."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def print_header(title: str) -> None:
    info = machine_info()
    print(f"## {title}\n")
    print(f"command: `{command_line()}`  ")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()) + "  ")
    print(f"load average at start: {load_average()}\n", flush=True)


def cpu_idle(window_s: float = 0.5) -> float:
    """Fraction of all CPUs idle over ``window_s`` (from /proc/stat); this process sleeps meanwhile,
    so it measures what the machine's other users leave."""

    def read() -> tuple[int, int]:
        vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return vals[3] + vals[4], sum(vals[:8])

    try:
        i0, t0 = read()
        time.sleep(window_s)
        i1, t1 = read()
    except (OSError, ValueError, IndexError):
        return 1.0
    return (i1 - i0) / max(1, t1 - t0)


QUIET_LOG: list[float] = []
QUIET_MAX_WAIT_S = 45.0  # --quick lowers it


def wait_quiet(max_wait_s: float | None = None, threshold: float = 0.8) -> float:
    """Before a timed repetition: wait (at most ``max_wait_s``) until at least ``threshold`` of the
    CPUs are idle. The machine is shared; this lowers, never removes, interference. Records the idle
    fraction seen when the repetition started (see ``quiet_summary``)."""
    deadline = time.monotonic() + (QUIET_MAX_WAIT_S if max_wait_s is None else max_wait_s)
    idle = cpu_idle()
    while idle < threshold and time.monotonic() < deadline:
        idle = cpu_idle()
    QUIET_LOG.append(idle)
    return idle


def quiet_summary() -> str:
    if not QUIET_LOG:
        return "no idle checks"
    quiet = sum(x >= 0.8 for x in QUIET_LOG)
    return (f"CPU idle before each timed repetition: median {100 * median(QUIET_LOG):.0f} %, "
            f"min {100 * min(QUIET_LOG):.0f} %; {quiet}/{len(QUIET_LOG)} started with ≥ 80 % idle")


def print_footer() -> None:
    print(f"\n{quiet_summary()}")
    print(f"\nload average at end: {load_average()}")


# ---------------------------------------------------------------------------------------------- checkpoints
def bench_cache() -> Path:
    from cluster.local import cache_dir

    return cache_dir() / "bench"


def model_config(preset: str = DEFAULT_PRESET, vocab: int | None = None, max_pos: int | None = None):
    from workers.model.presets import load_preset

    config = load_preset(preset)
    changes = {}
    if vocab is not None:
        changes["vocab_size"] = vocab
    if max_pos is not None:
        changes["max_position_embeddings"] = max_pos
    return dataclasses.replace(config, **changes) if changes else config


def checkpoint(preset: str = DEFAULT_PRESET, vocab: int | None = None) -> Path:
    """A random checkpoint (seed 0, HF layout, bf16 tensors as ``dsaserve model init`` writes), made
    once in the cache."""
    name = f"{preset}-seed{SEED}" + (f"-vocab{vocab}" if vocab is not None else "")
    return config_checkpoint(model_config(preset, vocab), name)


def load_hf(path: Path, dtype: torch.dtype = torch.float32):
    """transformers' DeepseekV32ForCausalLM on the same checkpoint in ``dtype``, eager attention."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.from_pretrained(path)
    # config.json as written by dsaserve carries no num_key_value_heads; transformers then defaults to
    # 128, and its eager attention's repeat_kv(n_rep = heads // 128 = 0) returns no heads. MLA has one
    # key/value per head: say so explicitly.
    config.num_key_value_heads = config.num_attention_heads
    model = transformers.DeepseekV32ForCausalLM.from_pretrained(
        path, config=config, dtype=dtype, attn_implementation="eager")
    return model.eval()


def random_ids(n: int, seed: int, low: int = 2, high: int = 1024) -> list[int]:
    """Random prompt token ids (no BOS/EOS), distinct per seed so the prefix cache never hits."""
    return torch.randint(low, high, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------------------------------------- timing
def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], object], reps: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``reps`` calls of ``fn`` (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def fmt_times(xs: list[float], unit: float = 1.0, digits: int = 3) -> str:
    """'median (min–max, n=N)' in the given unit (1 = seconds, 1e-3 = ms)."""
    ys = [x / unit for x in xs]
    return f"{median(ys):.{digits}f} ({min(ys):.{digits}f}–{max(ys):.{digits}f}, n={len(ys)})"


def matmul_gflops(n: int = 2048, reps: int = 5) -> list[float]:
    """This machine's fp32 ``torch.mm`` throughput, n×n×n, GFLOP/s per repetition."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    times = timed(lambda: torch.mm(a, b, out=out), reps, warmup=2)
    return [2 * n**3 / t / 1e9 for t in times]


def run_async(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------------------------------------- FLOPs
def prefill_flops(config, n: int, *, cached: int = 0, head_positions: int = 1) -> dict[str, float]:
    """Analytic FLOPs (2 per multiply-add) of prefilling tokens ``[cached, cached + n)`` as dsaserve
    computes them: absorbed MLA (W_UK folded into q, W_UV after the attention) over the ``index_topk``
    selected latents per query, the indexer's dense scoring of every visible key, the dense MLP or the
    MoE's activated experts (routed + shared) and its router, and the output head for
    ``head_positions`` positions only. Norms, RoPE, softmax, top-k selection and gathers are not
    counted (they are not FLOPs a matmul roofline would credit).
    """
    c = config
    d, h = c.hidden_size, c.num_attention_heads
    r, p, nope, v = c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim
    hi, di, k = c.index_n_heads, c.index_head_dim, c.index_topk
    mm = lambda a, b: 2 * a * b  # one [1, a] × [a, b] product per token  # noqa: E731
    proj = (mm(d, c.q_lora_rank) + mm(c.q_lora_rank, h * (nope + p)) + mm(d, r + p) + mm(h * v, d)
            + h * mm(nope, r) + h * mm(r, v))  # wq_a, wq_b, wkv_a, wo, absorb W_UK, W_UV
    idx_proj = mm(c.q_lora_rank, hi * di) + mm(d, di) + mm(d, hi)  # indexer wq_b, wk, weights_proj
    # Keys visible to query at position t: t + 1 (causal). Sum over the n new queries.
    visible = sum(range(cached + 1, cached + n + 1))
    selected = sum(min(k, t) for t in range(cached + 1, cached + n + 1))
    idx_score = visible * (2 * hi * di + 2 * hi)  # q·k per head, then the weighted sum over heads
    attn = selected * h * (2 * (r + p) + 2 * r)  # scores over [c_kv | k_pe], probs · c_kv
    dense_ffn = 3 * mm(d, c.intermediate_size)
    moe_ffn = (c.num_experts_per_tok + c.n_shared_experts) * 3 * mm(d, c.moe_intermediate_size) + mm(d, c.n_routed_experts)
    n_dense = min(c.first_k_dense_replace, c.num_hidden_layers)
    n_moe = c.num_hidden_layers - n_dense
    L = c.num_hidden_layers
    parts = {
        "projections": L * n * (proj + idx_proj),
        "attention (top-k)": L * attn,
        "indexer scoring": L * idx_score,
        "ffn (dense + activated experts)": n * (n_dense * dense_ffn + n_moe * moe_ffn),
        "lm_head": head_positions * mm(d, c.vocab_size),
    }
    parts["total"] = sum(parts.values())
    return parts


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- profiling
# (owner, attribute, label): dsaserve functions wrapped in torch.profiler.record_function by ``instrument``.
def _targets():
    from workers.engine.runner import ModelRunner
    from workers.model import indexer, mla, model, moe, step_attention

    return [
        (indexer.Indexer, "keys", "indexer.keys (wk, LayerNorm, RoPE)"),
        (indexer.Indexer, "queries", "indexer.queries (wq_b, weights_proj)"),
        (indexer.Indexer, "select", "indexer: scoring + top-k (all slabs)"),
        (indexer, "select_topk", "indexer: mask + top-k + tie sort"),
        (mla.MLA, "project", "MLA projections (q, kv latent, index keys)"),
        (step_attention, "write_step", "paged KV write"),
        (step_attention, "_decode", "attention: decode rows (batched)"),
        (step_attention, "_prefill_dense", "attention: dense causal prefill (MHA form)"),
        (step_attention, "_prefill_sparse", "attention: sparse prefill (indexer + top-k attention)"),
        (moe.MoE, "forward", "MoE layer (router + experts + shared)"),
        (moe.MoE, "routed", "MoE routed experts (grouped)"),
        (moe.Gate, "forward", "MoE router (gate)"),
        (model.DeepseekV32, "head_logits", "final norm + lm_head"),
        (model.DeepseekV32, "hidden_step", "model.hidden_step (all layers)"),
        (ModelRunner, "run", "runner.run (one step)"),
    ]


def instrument() -> list[str]:
    """Wrap dsaserve's main stages in ``record_function`` labels (idempotent); returns the labels."""
    import functools

    in_thread_profiling()

    labels = []
    for owner, name, label in _targets():
        labels.append(label)
        raw = owner.__dict__[name]
        if getattr(raw, "_bench_label", None):
            continue
        is_static = isinstance(raw, staticmethod)
        fn = raw.__func__ if is_static else raw

        def wrap(fn=fn, label=label):
            @functools.wraps(fn)
            def inner(*a, **k):
                with torch.profiler.record_function(label):
                    return fn(*a, **k)
            inner._bench_label = label
            return inner

        new = wrap()
        setattr(owner, name, staticmethod(new) if is_static else new)
        if is_static:
            owner.__dict__[name]._bench_label = label
    return labels


def best_profile(run_once: Callable[[int], None], tries: int = 3):
    """Profile ``run_once(i)`` ``tries`` times (each after ``wait_quiet``) and keep the fastest run:
    on a shared machine a single profile can be dominated by other users' load.
    → (profiler, wall seconds of the kept run, every run's wall seconds)."""
    from torch.profiler import ProfilerActivity, profile

    best, walls = None, []
    for i in range(tries):
        wait_quiet()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t0 = time.perf_counter()
            run_once(i)
            wall = time.perf_counter() - t0
        walls.append(wall)
        if best is None or wall < best[1]:
            best = (prof, wall)
    return best[0], best[1], walls


def stage_table(prof, labels: list[str], wall_s: float) -> str:
    """Inclusive time per instrumented stage (CPU time of the labelled ranges; nested stages overlap)."""
    rows = []
    for evt in prof.key_averages():
        if evt.key in labels:
            total_ms = evt.cpu_time_total / 1e3
            rows.append((total_ms, evt.key, evt.count))
    rows.sort(reverse=True)
    return markdown_table(["stage (inclusive)", "ms", "% of wall", "calls"],
                          [[k, f"{ms:.0f}", f"{100 * ms / 1e3 / wall_s:.0f} %", n] for ms, k, n in rows])


def op_table(prof, rows: int = 15) -> str:
    """Top aten ops by self CPU time, with input shapes."""
    evts = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    evts.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in evts) or 1
    return markdown_table(
        ["op", "input shapes", "self ms", "% of op time", "calls"],
        [[e.key, str(e.input_shapes)[:70].replace("|", "/"), f"{e.self_cpu_time_total / 1e3:.0f}",
          f"{100 * e.self_cpu_time_total / total:.1f} %", e.count] for e in evts[:rows]],
    )


# ---------------------------------------------------------------------------------------------- dtypes, roofline, peers
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def default_dtype_name() -> str:
    """What ``--dtype auto`` picks on this machine (bfloat16 where the CPU computes it natively)."""
    from workers.model.device import dtype_name, resolve_dtype

    return dtype_name(resolve_dtype("auto"))


def stop_peer(proc, timeout_s: float) -> None:
    """Ask a benchmark peer process (JSON lines on stdin) to quit; kill it if it does not in time."""
    if proc.poll() is not None:
        return
    try:
        proc.stdin.write('{"op": "quit"}\n')
        proc.stdin.flush()
        proc.wait(timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights/activations dtype (default: bfloat16 if the CPU has avx512_bf16 or amx_bf16, else float32)")


def matmul_gflops_dtype(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 5) -> list[float]:
    """``torch.mm`` throughput in ``dtype``, n×n×n, GFLOP/s per repetition (fp32: same as ``matmul_gflops``)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    times = timed(lambda: torch.mm(a, b, out=out), reps, warmup=2)
    return [2 * n**3 / t / 1e9 for t in times]


def copy_gbs(mib: int = 1024, reps: int = 5) -> list[float]:
    """Memory bandwidth of a large tensor copy into a preallocated tensor (no page faults), GB/s of
    bytes read + bytes written (the STREAM "copy" convention: a write-allocate cache also reads the
    destination, which this does not count). ``mib`` per tensor, well above any L3."""
    n = mib * 2**20 // 4
    src = torch.ones(n)
    dst = torch.empty(n)
    times = timed(lambda: dst.copy_(src), reps, warmup=2)
    return [2 * n * 4 / t / 1e9 for t in times]


def config_checkpoint(config, name: str) -> Path:
    """A random checkpoint (seed 0, bf16 tensors as ``dsaserve model init`` writes) of any ModelConfig,
    made once under ``bench_cache() / name``."""
    from workers.model.writer import random_state_dict, write_checkpoint

    path = bench_cache() / name
    if (path / "config.json").is_file():
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write_checkpoint(tmp, config, random_state_dict(config, seed=SEED))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(path)
    except OSError:
        if not (path / "config.json").is_file():
            raise
    return path


def start_local(path, engine_config=None, *, dtype: torch.dtype = torch.float32, disaggregate: bool = False):
    """A ``LocalBackend`` serving ``path`` in ``dtype``: through ``LocalBackend.start`` where it takes a
    dtype, else its constructor (which does)."""
    import inspect

    from cluster.local import LocalBackend
    from workers.engine.config import EngineConfig

    engine_config = engine_config or EngineConfig()
    if "num_threads" in inspect.signature(LocalBackend.start).parameters:
        return LocalBackend.start(path, engine_config=engine_config, disaggregate=disaggregate, dtype=dtype,
                                  num_threads=ENGINE_THREADS)
    if "dtype" in inspect.signature(LocalBackend.start).parameters:
        return LocalBackend.start(path, engine_config=engine_config, disaggregate=disaggregate, dtype=dtype)
    return LocalBackend(Path(path), engine_config, disaggregate=disaggregate, dtype=dtype)


async def stream_tokens(backend, request) -> tuple[list[int], list[float]]:
    """Run one request on a backend → (its token ids, the perf_counter time each token arrived)."""
    ids: list[int] = []
    stamps: list[float] = []
    async for out in backend.generate(request):
        if out.error:
            raise RuntimeError(out.error)
        now = time.perf_counter()
        ids.extend(out.new_token_ids)
        stamps.extend([now] * len(out.new_token_ids))
    return ids, stamps
