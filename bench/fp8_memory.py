"""FP8 weights stay FP8: a server's resident memory on an FP8 checkpoint vs the bf16 one.

    .venv/bin/python -m bench.fp8_memory [--preset small] [--keep DIR]

Writes one preset's random weights twice (same seed, no MTP layer: the server does not load it): as an
FP8 checkpoint (block e4m3 projections + ``weight_scale_inv``, as DeepSeek ships) and as a bf16
checkpoint. Then, one at a time, starts ``dsaserve local --dtype bfloat16 --device cpu --port 0`` on
the bf16 checkpoint, on the FP8 one (``--fp8-weights resident``, the default) and, as a control, on the
FP8 one with ``--fp8-weights dequantize`` (the old behaviour); waits for its ready line, sends one
greedy request, and reads ``/proc/PID/status``: ``RssAnon`` (memory the process owns: heap, KV cache
and every weight — the loader copies weights out of the checkpoint's mapping) and ``RssFile`` (mapped
files: the same Python/torch libraries in every run, plus checkpoint pages still in the mapping).

Goal (issue "GPU path", part 3): the FP8 server's resident (anonymous) memory, after a request so every
projection has been used, is below the bf16 server's by at least 80 % of the difference of the two
checkpoints' sizes. The control should miss it.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common as C

READY = re.compile(r"dsaserve: ready on (\S+):(\d+)")
GOAL = 0.8


def write_pair(root: Path, preset: str, seed: int) -> dict[str, Path]:
    """The preset's random weights as ``root/fp8`` and ``root/bf16`` checkpoints (skipped if present)."""
    from workers.model.presets import load_preset
    from workers.model.writer import random_state_dict, write_checkpoint

    config = dataclasses.replace(load_preset(preset), num_nextn_predict_layers=0)
    dirs = {"fp8": root / "fp8", "bf16": root / "bf16"}
    if all((d / "config.json").is_file() for d in dirs.values()):
        return dirs
    state = random_state_dict(config, with_mtp=False, seed=seed)
    for name, d in dirs.items():
        shutil.rmtree(d, ignore_errors=True)
        write_checkpoint(d, config, state, fp8=name == "fp8")
    return dirs


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def rss(pid: int) -> dict[str, int]:
    """Resident bytes of a process (Linux): ``VmRSS``, ``RssAnon``, ``RssFile``."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.partition(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024
    return out


def measure(model_dir: Path, fp8_weights: str, timeout_s: float) -> dict:
    """Start a local server on ``model_dir``; its resident memory when ready and after one request,
    and its start-up time."""
    from router.client import Client

    cmd = [sys.executable, "-m", "cluster.cli_serve", "local", "--model", str(model_dir), "--dtype", "bfloat16",
           "--device", "cpu", "--port", "0", "--fp8-weights", fp8_weights]
    root = Path(__file__).resolve().parents[1]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        for line in proc.stdout:
            if m := READY.search(line):
                port = int(m.group(2))
                break
            if time.monotonic() - t0 > timeout_s:
                break
        if port is None:
            raise RuntimeError(f"server on {model_dir} did not become ready (exit {proc.poll()})")
        ready_s = time.monotonic() - t0
        time.sleep(1.0)  # let start-up garbage settle
        ready = rss(proc.pid)
        with Client(f"127.0.0.1:{port}", timeout=timeout_s) as client:
            client.generate(prompt_ids=list(range(10, 74)), max_tokens=8, ignore_eos=True)
        return {"ready_s": ready_s, "ready": ready, "after": rss(proc.pid)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", help="model preset (default: small)")
    p.add_argument("--seed", type=int, default=C.SEED)
    p.add_argument("--keep", type=Path, default=None, help="write/reuse the checkpoints here (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a server (default: 600)")
    args = p.parse_args()

    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="fp8-memory-")
    root = args.keep or Path(tmp.name)
    try:
        dirs = write_pair(root, args.preset, args.seed)
        sizes = {name: checkpoint_bytes(d) for name, d in dirs.items()}
        runs = {"bf16": measure(dirs["bf16"], "resident", args.timeout),
                "fp8 resident": measure(dirs["fp8"], "resident", args.timeout),
                "fp8 dequantize": measure(dirs["fp8"], "dequantize", args.timeout)}
    finally:
        if tmp is not None:
            tmp.cleanup()

    mib = 2**20
    print(f"\npreset {args.preset}: dsaserve local --dtype bfloat16 --device cpu; MiB; after = after one "
          f"64-token prompt, 8 tokens\n")
    print("| server (--fp8-weights) | checkpoint | VmRSS ready | VmRSS after | RssAnon after | RssFile after "
          "| ready in (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        size = sizes["bf16" if name == "bf16" else "fp8"]
        print(f"| {name} | {size / mib:.1f} | {r['ready']['VmRSS'] / mib:.1f} | {r['after']['VmRSS'] / mib:.1f} "
              f"| {r['after']['RssAnon'] / mib:.1f} | {r['after']['RssFile'] / mib:.1f} | {r['ready_s']:.1f} |")
    disk = sizes["bf16"] - sizes["fp8"]
    print(f"\ncheckpoint difference: {disk / mib:.1f} MiB; goal: RssAnon after ≥ {GOAL:.0%} of it below bf16's")
    for name in ("fp8 resident", "fp8 dequantize"):
        saved = runs["bf16"]["after"]["RssAnon"] - runs[name]["after"]["RssAnon"]
        total = runs["bf16"]["after"]["VmRSS"] - runs[name]["after"]["VmRSS"]
        verdict = "met" if saved >= GOAL * disk else "missed"
        print(f"{name}: RssAnon {saved / mib:.1f} MiB below bf16 = {saved / disk:.0%} of the difference: {verdict} "
              f"(VmRSS: {total / mib:.1f} MiB = {total / disk:.0%})")


if __name__ == "__main__":
    main()
