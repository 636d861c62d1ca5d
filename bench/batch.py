"""Batch throughput: 16 prompts × 256 tokens → 64 new tokens each (greedy, EOS ignored).

    .venv/bin/python -m bench.batch [--quick]

dsaserve: all prompts submitted at once to ``LocalBackend`` (continuous batching), both with
disaggregated prefill → decode engines and with one engine. transformers: ``generate`` on the padded
batch (left padding, attention mask; the prompts are equal-length so no pad is needed) with its
KV cache, ``do_sample=False``, exactly 64 new tokens. Same checkpoint, float32, same thread count;
fresh prompts each repetition (the prefix cache never hits), identical prompts for both systems.
"""

from __future__ import annotations

import asyncio
import time

import torch

from bench import common as C


def prompts(rep: int, n_prompts: int, prompt_len: int) -> list[list[int]]:
    return [C.random_ids(prompt_len, 50_000 + rep * 1000 + j) for j in range(n_prompts)]


class DsaserveBatch:
    """A LocalBackend; ``__call__`` submits a batch at once → (wall seconds first submit → last token, ids)."""

    def __init__(self, path, new: int, disaggregate: bool, dtype: torch.dtype) -> None:
        from workers.engine.types import SamplingParams

        self.backend = C.start_local(path, dtype=dtype, disaggregate=disaggregate)
        self.params = SamplingParams(max_tokens=new, ignore_eos=True)
        self.new = new
        self.calls = 0

    def __call__(self, ps: list[list[int]]) -> tuple[float, list[list[int]]]:
        from workers.engine.types import GenerateRequest

        self.calls += 1
        tag = f"b{self.calls}"

        async def one(rid: str, ids: list[int]) -> list[int]:
            got: list[int] = []
            async for out in self.backend.generate(GenerateRequest(rid, tuple(ids), self.params)):
                if out.error:
                    raise RuntimeError(out.error)
                got.extend(out.new_token_ids)
            return got

        async def batch() -> tuple[float, list[list[int]]]:
            t0 = time.perf_counter()
            outs = await asyncio.gather(*(one(f"{tag}-{j}", p) for j, p in enumerate(ps)))
            return time.perf_counter() - t0, list(outs)

        t, outs = C.run_async(batch())
        assert all(len(o) == self.new for o in outs), [len(o) for o in outs]
        return t, outs

    def close(self) -> None:
        self.backend.close()


class HFBatch:
    """transformers ``generate`` on the left-padded batch, in its own process → (wall seconds, ids)."""

    def __init__(self, path, new: int, dtype: str, threads: int) -> None:
        from bench.hf_peer import HFPeer

        self.peer = HFPeer(path, dtype, threads)
        self.new = new

    def __call__(self, ps: list[list[int]]) -> tuple[float, list[list[int]]]:
        out = self.peer.call(op="generate", prompts=ps, new=self.new)
        assert all(len(o) == self.new for o in out["outs"])
        return out["seconds"], out["outs"]

    def close(self) -> None:
        self.peer.close()


def head_ms(path, batch: int, dtype: torch.dtype) -> float:
    """Median ms of the final norm + lm_head for one decode step of ``batch`` sequences (dsaserve)."""
    from workers.model.checkpoint import load_model

    C.in_thread_profiling()  # after the timed runs: the main thread may use the engine's threads now
    model = load_model(path, dtype=dtype)
    h = torch.randn(batch, 1, model.config.hidden_size, dtype=dtype)
    with torch.inference_mode():
        return 1e3 * C.median(C.timed(lambda: model.head_logits(h), 20, warmup=3))


def profile_batch(path, n_prompts: int, prompt_len: int, new: int, dtype: torch.dtype, tries: int = 3) -> None:
    """Whole batches on an Engine stepped on this thread (the profiler does not see LocalBackend's engine
    thread), under torch.profiler: the prefill phase (until every sequence has its first token) and the
    decode phase, each the fastest of ``tries`` batches."""
    from workers.engine.config import EngineConfig
    from workers.engine.engine import Engine
    from workers.engine.types import GenerateRequest, SamplingParams
    from workers.model.checkpoint import load_model

    labels = C.instrument()
    engine = Engine(load_model(path, dtype=dtype), EngineConfig(), role="both")
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    state: dict = {}

    def submit(tag: str, batch: list[list[int]]) -> list:
        outs: list = []
        for j, p in enumerate(batch):
            engine.add_request(GenerateRequest(f"{tag}-{j}", tuple(p), params), outs.append)
        return outs

    def prefill_phase(i: int) -> None:
        outs = state["outs"] = submit(f"prof{i}", prompts(100 + i, n_prompts, prompt_len))
        while len({o.request_id for o in outs}) < n_prompts:
            engine.step()

    def decode_phase(i: int) -> None:
        while sum(o.finished for o in state["outs"]) < n_prompts:
            engine.step()

    warm = submit("warm", prompts(99, n_prompts, prompt_len))
    while sum(o.finished for o in warm) < n_prompts:
        engine.step()
    best: dict[str, tuple] = {}
    walls: dict[str, list[float]] = {"prefill": [], "decode": []}
    for i in range(tries):
        for phase, fn in (("prefill", prefill_phase), ("decode", decode_phase)):
            prof, wall, _ = C.best_profile(lambda _i: fn(i), 1)
            walls[phase].append(wall)
            if phase not in best or wall < best[phase][1]:
                best[phase] = (prof, wall)
    for phase in ("prefill", "decode"):
        prof, wall = best[phase]
        print(f"\n### Profile: {phase} phase of the batch (engine stepped in-thread; fastest of "
              f"{', '.join(f'{w:.2f}' for w in walls[phase])} s under the profiler)\n")
        print(C.stage_table(prof, labels, wall))
        print()
        print(C.op_table(prof, 12))


def agreement(a: list[list[list[int]]], b: list[list[list[int]]]) -> tuple[float, float]:
    """(fraction of sequences identical, mean fraction of the leading tokens that agree)."""
    same, prefix, n = 0, 0.0, 0
    for xa, xb in zip(a, b):
        for sa, sb in zip(xa, xb):
            n += 1
            same += sa == sb
            k = next((i for i, (u, v) in enumerate(zip(sa, sb)) if u != v), len(sa))
            prefix += k / len(sa)
    return same / n, prefix / n


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--single-only", action="store_true", help="skip the disaggregated dsaserve run"),
        p.add_argument("--profile", action="store_true", help="also profile the batch on one in-thread engine"),
        p.add_argument("--profile-only", action="store_true", help="only the profile (no timing runs)"),
    ))
    C.setup_threads(args.threads)
    n_prompts, prompt_len, new = (4, 64, 8) if args.quick else (16, 256, 64)
    reps = args.reps or (1 if args.quick else 3)
    path = C.checkpoint(vocab=args.vocab)
    C.print_header(f"Batch: {n_prompts} prompts × {prompt_len} tokens → {new} new tokens each")
    dtype = C.DTYPES[args.dtype]
    if args.profile_only:
        profile_batch(path, n_prompts, prompt_len, new, dtype)
        C.print_footer()
        return
    batches = [prompts(i, n_prompts, prompt_len) for i in range(reps)]
    out_tokens = n_prompts * new

    single = "dsaserve, one engine (disaggregate=False)"
    hf_key = "transformers generate (eager, batch, KV cache)"
    # One system alive at a time: two dsaserve backends in one process mean two engine threads, each
    # with its own OpenMP team, which slows both (workers.host). transformers runs in its own process.
    factories = {single: lambda: DsaserveBatch(path, new, False, dtype)}
    if not args.single_only:
        factories["dsaserve, prefill → decode engines (disaggregate=True)"] = lambda: DsaserveBatch(path, new, True, dtype)
    if not args.no_hf:
        factories[hf_key] = lambda: HFBatch(path, new, args.dtype, args.threads)
    warm = [C.random_ids(prompt_len, 49_000 + j) for j in range(n_prompts)]
    results: dict[str, tuple[list[float], list[list[list[int]]]]] = {k: ([], []) for k in factories}
    for k, make in factories.items():
        run = make()
        run(warm)
        for ps in batches:  # identical prompts for every system
            C.wait_quiet()
            t, outs = run(ps)
            results[k][0].append(t)
            results[k][1].append(outs)
        run.close()

    base = C.median(results[hf_key][0]) if hf_key in results else None
    rows = []
    for name, (times, _) in results.items():
        m = C.median(times)
        rows.append([name, C.fmt_times(times), f"{out_tokens / m:.1f}", "" if base is None else f"{base / m:.2f}×"])
    print(C.markdown_table(["system", "wall seconds: median (min–max, n)", "output tokens/s", "speed-up vs transformers"], rows))
    print(f"\n{out_tokens} output tokens per run ({n_prompts} × {new}); {n_prompts * prompt_len} prompt tokens.")
    hm = head_ms(path, n_prompts, dtype)
    ours = C.median(results[single][0])
    print(f"\nlm_head ({C.model_config(vocab=args.vocab).vocab_size} vocab) for one decode step of {n_prompts}: {hm:.2f} ms → "
          f"{new - 1} steps ≈ {hm * (new - 1) / 1e3:.2f} s = {100 * hm * (new - 1) / 1e3 / ours:.0f} % of dsaserve's wall "
          f"(paid equally by transformers).")
    if hf_key in results:
        same, prefix = agreement(results[single][1], results[hf_key][1])
        print(f"\nGreedy outputs, dsaserve vs transformers: {100 * same:.0f} % of sequences identical, "
              f"{100 * prefix:.0f} % of tokens agree before the first divergence (random weights tie index scores at 0; "
              "the two break top-k ties differently — see bench.prefill's sanity check for exact parity).")
        best = max(base / C.median(t) for k, (t, _) in results.items() if k != hf_key)
        paired = {k: C.median([h / o for h, o in zip(results[hf_key][0], t)]) for k, (t, _) in results.items() if k != hf_key}
        print(f"\nGoal ≥ 4× transformers: {'MET' if best >= 4 else 'MISSED'} (best dsaserve mode {best:.2f}×, ratio of medians"
              f"{'' if best >= 4 else f'; needs {4 / best:.1f}× more'}). Median of per-repetition ratios: "
              + ", ".join(f"{k.split(' (')[0].removeprefix('dsaserve, ')} {v:.2f}×" for k, v in paired.items()))
    if args.profile:
        profile_batch(path, n_prompts, prompt_len, new, dtype)
    C.print_footer()


if __name__ == "__main__":
    main()
