"""Decode time per token against context length (2K … 32K), one sequence.

    .venv/bin/python -m bench.decode_curve [--quick]

dsaserve: a request through ``LocalBackend`` (``disaggregate=False``) whose prompt ends 17 tokens
short of the context; the first token comes from the prefill, the next 16 are decode steps, timed by
the arrival of each streamed token. ``--reps`` requests (default 3) per context with the same prompt
(the repeats hit the prefix cache, so only their decode is new work) → median and mean of the
3 × 16 gaps. The prompts of successive contexts share their prefix (one random id sequence), so each
first prefill only computes what the prefix cache lacks — decode cost does not depend on how the KV
got there. transformers: one forward of the prompt with ``use_cache=True``, then 1 + 3 × 16 greedy
single-token forwards with its cache, timed one by one (the first dropped as warm-up); skipped at contexts whose prefill is estimated
(quadratic extrapolation of the last measured one, or memory for its dense [heads, S, S] score
matrices) to take more than ``--hf-max-prefill-s`` seconds or 70 % of the available memory.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench import common as C

STEPS = 16  # decode steps timed per context


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 34


class DsaserveDecode:
    """One LocalBackend (one engine); ``__call__(prompt)`` → (prefill s, STEPS decode gaps in s)."""

    def __init__(self, path) -> None:
        from cluster.local import LocalBackend
        from workers.engine.config import EngineConfig
        from workers.engine.types import SamplingParams

        self.backend = LocalBackend.start(path, engine_config=EngineConfig(), disaggregate=False)
        self.params = SamplingParams(max_tokens=STEPS + 1, ignore_eos=True)
        self.calls = 0

    def __call__(self, ids: list[int]) -> tuple[float, list[float]]:
        from workers.engine.types import GenerateRequest

        self.calls += 1
        req = GenerateRequest(f"decode-{self.calls}", tuple(ids), self.params)

        async def go() -> list[float]:
            stamps = [time.perf_counter()]
            async for o in self.backend.generate(req):
                if o.error:
                    raise RuntimeError(o.error)
                stamps.extend(time.perf_counter() for _ in o.new_token_ids)
            return stamps

        stamps = C.run_async(go())
        assert len(stamps) == STEPS + 2, len(stamps)
        return stamps[1] - stamps[0], [b - a for a, b in zip(stamps[1:], stamps[2:])]

    def close(self) -> None:
        self.backend.close()


class HFDecode:
    """transformers: prefill forward with its cache, then STEPS + 1 greedy single-token forwards."""

    def __init__(self, path) -> None:
        self.model = C.load_hf(path)
        cfg = self.model.config
        self.heads = max(cfg.num_attention_heads, cfg.index_n_heads)
        self.last: tuple[int, float] | None = None  # (prompt length, prefill seconds) of the last run

    def skip_reason(self, n: int, max_prefill_s: float) -> str | None:
        est = None if self.last is None else self.last[1] * (n / self.last[0]) ** 2
        # Peak growth measured at 8K: 2.7 GiB ≈ 10 · heads · S² bytes (float32 [heads, S, S] score tensors).
        need = 11 * self.heads * n * n
        if est is not None and est > max_prefill_s:
            return f"skipped: prefill est. {est:.0f} s > {max_prefill_s:.0f} s"
        if need > 0.7 * mem_available():
            return f"skipped: prefill needs ~{need / 2**30:.0f} GiB (dense score matrices)"
        return None

    def __call__(self, ids: list[int], steps: int = STEPS) -> tuple[float, list[float]]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            res = self.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            prefill = time.perf_counter() - t0
            self.last = (len(ids), prefill)
            cache, nxt = res.past_key_values, res.logits[:, -1:].argmax(-1)
            gaps = []
            for _ in range(steps + 1):
                t0 = time.perf_counter()
                res = self.model(nxt, past_key_values=cache, use_cache=True)
                gaps.append(time.perf_counter() - t0)
                cache, nxt = res.past_key_values, res.logits[:, -1:].argmax(-1)
        return prefill, gaps[1:]  # the first cached step is a warm-up

    def close(self) -> None:
        del self.model


def profile_decode(path, ctx: int, tries: int = 3) -> None:
    """STEPS decode steps of one sequence at ``ctx`` on an Engine stepped on this thread (the profiler does
    not see LocalBackend's engine thread), under torch.profiler; the fastest of ``tries`` windows."""
    from workers.engine.config import EngineConfig
    from workers.engine.engine import Engine
    from workers.engine.types import GenerateRequest, SamplingParams
    from workers.model.checkpoint import load_model

    labels = C.instrument()
    engine = Engine(load_model(path), EngineConfig(), role="both")
    outs: list = []
    extra = tries * STEPS + 8
    n = ctx - extra
    engine.add_request(GenerateRequest("prof", tuple(C.random_ids(n, 61_000)), SamplingParams(max_tokens=extra, ignore_eos=True)), outs.append)
    while not outs:
        engine.step()
    for _ in range(3):
        engine.step()

    def steps(_i: int) -> None:
        for _ in range(STEPS):
            engine.step()

    prof, wall, walls = C.best_profile(steps, tries)
    print(f"\n### Profile: {STEPS} dsaserve decode steps at context ≈{ctx} (engine stepped in-thread; fastest of "
          f"{', '.join(f'{1e3 * w / STEPS:.1f}' for w in walls)} ms/step under the profiler)\n")
    print(C.stage_table(prof, labels, wall))
    print()
    print(C.op_table(prof, 10))


def bar(ms: float, scale: float, width: int = 40) -> str:
    return "█" * max(1, round(width * ms / scale))


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--contexts", type=str, default=None, help="comma-separated context lengths"),
        p.add_argument("--hf-max-prefill-s", type=float, default=120.0),
        p.add_argument("--profile", type=int, default=None, metavar="CONTEXT",
                       help="also profile dsaserve decode steps at this context"),
        p.add_argument("--profile-only", action="store_true", help="only the profile(s) (no timing runs)"),
    ))
    C.setup_threads(args.threads, engine_on_main_thread=True)
    contexts = [int(x) for x in args.contexts.split(",")] if args.contexts else (
        [256, 512, 1024] if args.quick else [2048, 4096, 8192, 16384, 32768])
    path = C.checkpoint(vocab=args.vocab)
    config = C.model_config(vocab=args.vocab)
    if max(contexts) > config.max_position_embeddings:
        raise SystemExit(f"context {max(contexts)} > max_position_embeddings {config.max_position_embeddings}")
    C.print_header(f"Decode ms/token vs context ({', '.join(map(str, contexts))}), one sequence")
    if args.profile_only:
        for ctx in ([args.profile] if args.profile else contexts):
            profile_decode(path, ctx)
        C.print_footer()
        return
    base = C.random_ids(max(contexts), 60_000)
    reps = args.reps or (1 if args.quick else 3)

    ds = DsaserveDecode(path)
    hfd = None if args.no_hf else HFDecode(path)
    ds(C.random_ids(300, 77))  # warm-up
    if hfd is not None:
        hfd(C.random_ids(300, 77))
        hfd.last = None
    ours: dict[int, tuple[float, list[float]]] = {}
    hf: dict[int, tuple[float, list[float]] | str] = {}
    for ctx in contexts:  # interleaved: both systems at one context, then the next context
        prompt = base[: ctx - STEPS - 1]
        C.wait_quiet()
        ours[ctx] = ds(prompt)
        for _ in range(reps - 1):  # same prompt again: the prefix cache holds it, only decode is new work
            C.wait_quiet()
            ours[ctx][1].extend(ds(prompt)[1])
        print(f"  dsaserve ctx {ctx}: prefill {ours[ctx][0]:.1f} s, decode {1e3 * C.median(ours[ctx][1]):.2f} ms/token", flush=True)
        if hfd is None:
            continue
        reason = hfd.skip_reason(len(prompt), args.hf_max_prefill_s)
        if reason:
            hf[ctx] = reason
            print(f"  transformers ctx {ctx}: {reason}", flush=True)
        else:
            C.wait_quiet()
            hf[ctx] = hfd(prompt, reps * STEPS)
            print(f"  transformers ctx {ctx}: prefill {hf[ctx][0]:.1f} s, decode {1e3 * C.median(hf[ctx][1]):.2f} ms/token", flush=True)
    ds.close()
    if hfd is not None:
        hfd.close()

    rows = []
    for ctx in contexts:
        p, gaps = ours[ctx]
        row = [ctx, f"{1e3 * C.median(gaps):.2f}", f"{1e3 * sum(gaps) / len(gaps):.2f}", f"{p:.1f}"]
        h = hf.get(ctx)
        if isinstance(h, tuple):
            row += [f"{1e3 * C.median(h[1]):.2f}", f"{1e3 * sum(h[1]) / len(h[1]):.2f}", f"{h[0]:.1f}",
                    f"{C.median(h[1]) / C.median(gaps):.2f}×"]
        else:
            row += [h or "not run", "", "", ""]
        rows.append(row)
    print()
    print(C.markdown_table(["context", "dsaserve ms/token (median)", "(mean)", "dsaserve prefill s (incremental)",
                            "transformers ms/token (median)", "(mean)", "transformers prefill s", "speed-up"], rows))
    meds = {ctx: 1e3 * C.median(ours[ctx][1]) for ctx in contexts}
    hf_meds = {ctx: 1e3 * C.median(h[1]) for ctx, h in hf.items() if isinstance(h, tuple)}
    scale = max(list(meds.values()) + list(hf_meds.values()))
    print("\n```")
    for ctx in contexts:
        print(f"{ctx:>6}  dsaserve     {meds[ctx]:8.2f} ms {bar(meds[ctx], scale)}")
        if ctx in hf_meds:
            print(f"{'':>6}  transformers {hf_meds[ctx]:8.2f} ms {bar(hf_meds[ctx], scale)}")
    print("```")
    lo, hi = contexts[0], contexts[-1]
    growth = meds[hi] / meds[lo]
    print(f"\ndsaserve: {meds[hi]:.2f} ms/token at {hi} vs {meds[lo]:.2f} at {lo} — ×{growth:.2f} for ×{hi / lo:.0f} context "
          f"({'nearly flat' if growth < 1.25 else 'growing, far slower than the context' if growth < 2 else 'NOT flat'}; "
          "goal: nearly flat, read here as < ×1.25 over the range).")
    if len(hf_meds) >= 2:
        a, b = min(hf_meds), max(hf_meds)
        print(f"transformers: ×{hf_meds[b] / hf_meds[a]:.2f} from {a} to {b} (×{b / a:.0f} context).")
    if args.profile:
        profile_decode(path, args.profile)
    C.print_footer()


if __name__ == "__main__":
    main()
