"""transformers (and the machine's matmul speed) in a process of their own, driven by JSON lines.

Why a separate process: dsaserve's engine steps on its own thread, and a second OpenMP team in the same
process (transformers or a matmul measurement on the main thread) slows every small op of the other
one (see ``workers.host``). Each system gets a clean process; the benchmark alternates between them.

Protocol: one JSON object per line on stdin → one per line on stdout, tagged ``@peer``:
``{"op": "load", "path", "dtype", "threads"}``, ``{"op": "forward", "ids"}`` → seconds of one forward
with ``logits_to_keep=1``; ``{"op": "generate", "prompts", "new"}`` → seconds and token ids;
``{"op": "matmul", "dtype", "n"}`` → GFLOP/s of an n³ ``torch.mm``; ``{"op": "copy", "mib"}`` → GB/s
of a large copy; ``{"op": "quit"}``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

TAG = "@peer "


def serve() -> None:
    import torch

    from bench import common as C

    model = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            return
        if op == "threads":
            torch.set_num_threads(cmd["threads"])
            out = {"threads": torch.get_num_threads()}
        elif op == "load":
            torch.set_num_threads(cmd["threads"])
            model = C.load_hf(Path(cmd["path"]), C.DTYPES[cmd["dtype"]])
            out = {"threads": torch.get_num_threads()}
        elif op == "forward":
            ids = torch.tensor([cmd["ids"]])
            with torch.inference_mode():
                t0 = time.perf_counter()
                logits = model(ids, logits_to_keep=1).logits
                out = {"seconds": time.perf_counter() - t0}
            assert logits.shape[1] == 1
        elif op == "generate":
            out = _generate(model, cmd["prompts"], cmd["new"])
        elif op == "matmul":
            out = {"gflops": C.matmul_gflops_dtype(C.DTYPES[cmd["dtype"]], cmd.get("n", 2048), reps=cmd.get("reps", 2))}
        elif op == "copy":
            out = {"gbs": C.copy_gbs(cmd.get("mib", 1024), reps=cmd.get("reps", 3))}
        else:
            out = {"error": f"unknown op {op!r}"}
        print(TAG + json.dumps(out), flush=True)


def _generate(model, prompts: list[list[int]], new: int) -> dict:
    """``generate`` on the left-padded batch, greedy, exactly ``new`` tokens each."""
    import torch

    pad = 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, use_cache=True, pad_token_id=pad)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "outs": out[:, width:].tolist()}


class HFPeer:
    """The client side: starts ``python -m bench.hf_peer`` and sends it commands."""

    def __init__(self, path: Path | None, dtype: str, threads: int) -> None:
        root = Path(__file__).resolve().parents[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.hf_peer"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=root)
        self.threads = self.call(op="load", path=str(path), dtype=dtype, threads=threads)["threads"] if path \
            else self.call(op="threads", threads=threads)["threads"]

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(TAG):
                out = json.loads(line[len(TAG):])
                if "error" in out:
                    raise RuntimeError(out["error"])
                return out
        raise RuntimeError(f"the transformers peer exited (code {self.proc.wait()})")

    def close(self) -> None:
        from bench import common as C

        C.stop_peer(self.proc, 30)


if __name__ == "__main__":
    serve()
