"""Decode time per token against context length (2K … 32K), one sequence.

    .venv/bin/python -m bench.decode_curve [--quick]

dsaserve: one request through ``LocalBackend`` (``disaggregate=False``) whose prompt ends 17 tokens
short of the context; the first token comes from the prefill, the next 16 are decode steps, timed by
the arrival of each streamed token (median and mean of the 16 gaps). The prompts of successive
contexts share their prefix (one random id sequence), so each prefill only computes what the
prefix cache lacks — decode cost does not depend on how the KV got there. transformers: one forward
of the prompt with ``use_cache=True``, then 17 greedy single-token forwards with its cache, timed
one by one (median and mean of the last 16); skipped at contexts whose prefill is estimated
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


def dsaserve_curve(path, contexts: list[int], base: list[int]) -> dict[int, tuple[float, list[float]]]:
    """context → (prefill seconds, STEPS decode gaps in seconds)."""
    from cluster.local import LocalBackend
    from workers.engine.config import EngineConfig
    from workers.engine.types import GenerateRequest, SamplingParams

    params = SamplingParams(max_tokens=STEPS + 1, ignore_eos=True)
    out: dict[int, tuple[float, list[float]]] = {}
    with LocalBackend.start(path, engine_config=EngineConfig(), disaggregate=False) as be:

        async def one(rid: str, ids: list[int]) -> list[float]:
            stamps = [time.perf_counter()]
            async for o in be.generate(GenerateRequest(rid, tuple(ids), params)):
                if o.error:
                    raise RuntimeError(o.error)
                for _ in o.new_token_ids:
                    stamps.append(time.perf_counter())
            return stamps

        C.run_async(one("warm", C.random_ids(300, 77)))
        for ctx in contexts:
            stamps = C.run_async(one(f"ctx{ctx}", base[: ctx - STEPS - 1]))
            assert len(stamps) == STEPS + 2, len(stamps)
            gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
            out[ctx] = (stamps[1] - stamps[0], gaps)
            print(f"  dsaserve ctx {ctx}: prefill {out[ctx][0]:.1f} s, decode {1e3 * C.median(gaps):.2f} ms/token", flush=True)
    return out


def hf_curve(path, contexts: list[int], base: list[int], max_prefill_s: float) -> dict[int, tuple[float, list[float]] | str]:
    model = C.load_hf(path)
    cfg = model.config
    heads = max(cfg.num_attention_heads, cfg.index_n_heads)
    out: dict[int, tuple[float, list[float]] | str] = {}
    last: tuple[int, float] | None = None
    with torch.inference_mode():
        model(torch.tensor([C.random_ids(300, 77)]), use_cache=True, logits_to_keep=1)  # warm-up
        for ctx in contexts:
            n = ctx - STEPS - 1
            est = None if last is None else last[1] * (n / last[0]) ** 2
            need = 16 * heads * n * n  # ~4 live float32 [heads, S, S] tensors (indexer scores, attention)
            if est is not None and est > max_prefill_s:
                out[ctx] = f"skipped: prefill est. {est:.0f} s > {max_prefill_s:.0f} s"
                continue
            if need > 0.7 * mem_available():
                out[ctx] = f"skipped: prefill needs ~{need / 2**30:.0f} GiB (dense score matrices)"
                continue
            ids = torch.tensor([base[:n]])
            t0 = time.perf_counter()
            res = model(ids, use_cache=True, logits_to_keep=1)
            prefill = time.perf_counter() - t0
            last = (n, prefill)
            cache, nxt = res.past_key_values, res.logits[:, -1:].argmax(-1)
            gaps = []
            for _ in range(STEPS + 1):
                t0 = time.perf_counter()
                res = model(nxt, past_key_values=cache, use_cache=True)
                gaps.append(time.perf_counter() - t0)
                cache, nxt = res.past_key_values, res.logits[:, -1:].argmax(-1)
            out[ctx] = (prefill, gaps[1:])
            print(f"  transformers ctx {ctx}: prefill {prefill:.1f} s, decode {1e3 * C.median(gaps[1:]):.2f} ms/token", flush=True)
            del res, cache
    return out


def bar(ms: float, scale: float, width: int = 40) -> str:
    return "█" * max(1, round(width * ms / scale))


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--contexts", type=str, default=None, help="comma-separated context lengths"),
        p.add_argument("--hf-max-prefill-s", type=float, default=120.0),
    ))
    C.setup_threads(args.threads)
    contexts = [int(x) for x in args.contexts.split(",")] if args.contexts else (
        [256, 512, 1024] if args.quick else [2048, 4096, 8192, 16384, 32768])
    path = C.checkpoint(vocab=args.vocab)
    config = C.model_config(vocab=args.vocab)
    if max(contexts) > config.max_position_embeddings:
        raise SystemExit(f"context {max(contexts)} > max_position_embeddings {config.max_position_embeddings}")
    C.print_header(f"Decode ms/token vs context ({', '.join(map(str, contexts))}), one sequence")
    base = C.random_ids(max(contexts), 60_000)

    ours = dsaserve_curve(path, contexts, base)
    hf = {} if args.no_hf else hf_curve(path, contexts, base, args.hf_max_prefill_s)

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
          f"({'nearly flat' if growth < 1.5 else 'NOT flat'}; goal: nearly flat).")
    if len(hf_meds) >= 2:
        a, b = min(hf_meds), max(hf_meds)
        print(f"transformers: ×{hf_meds[b] / hf_meds[a]:.2f} from {a} to {b} (×{b / a:.0f} context).")

    C.print_footer()


if __name__ == "__main__":
    main()
