"""A whole model's decode step on the GPU: eager vs replayed from a CUDA graph (``DecodeGraphs``).

    python -m bench.gpu_decode [--preset small] [--batches 1,8,32,64] [--contexts 1024,8192] [--reps 20]

Random weights of a preset in bf16 on ``cuda``, a paged KV pool holding ``batch`` sequences of
``context`` tokens (their KV written by one eager prefill-shaped write of random latents: the step's
cost does not depend on the values), then one decode token per sequence:
- eager: ``StepBatch.build`` + ``hidden_step`` + head, as the engine runs a step with graphs off
  (``--enforce-eager``; the fused MoE and the Triton attention path are used either way);
- graph: ``DecodeGraphs.run`` (buffers filled, the bucket's graph replayed).
Reported: median ms per step and tokens/s; the ratio is what launch overhead costs. Exits with a
message where no CUDA device exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch


def _timed(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()  # the engine waits for the sampled tokens every step too
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--contexts", default="1024,8192")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench.gpu_decode: no CUDA device here")

    from kvstore.paged import BlockLayout, PagedKVStorage
    from workers.engine.graphs import DecodeGraphs, prepare_fused
    from workers.model.model import DeepseekV32
    from workers.model.presets import load_preset
    from workers.model.step import StepBatch
    from workers.model.writer import random_state_dict

    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    cfg = dataclasses.replace(load_preset(args.preset), num_nextn_predict_layers=0)
    model = DeepseekV32(cfg)
    model.load_state_dict(random_state_dict(cfg, seed=0, with_mtp=False), strict=False)
    model = model.to("cuda", torch.bfloat16).eval().configure(indexer="fp8")
    reason = prepare_fused(model)
    print(f"{torch.cuda.get_device_name()}, preset {args.preset} ({cfg.num_hidden_layers} layers, "
          f"{cfg.n_routed_experts} experts), bf16; graphs: {reason or 'ready'}")
    bs = 64
    max_blocks = max(contexts) // bs + 1
    layout = BlockLayout(cfg.num_hidden_layers, bs, cfg.latent_dim, torch.bfloat16, cfg.index_head_dim,
                         torch.float8_e4m3fn)
    storage = PagedKVStorage(layout, max(batches) * max_blocks, device="cuda")
    storage.buffer.random_(0, 60)  # every byte < 0x3C: small finite FP8 keys, bf16 latents and fp32 scales
    print("| context | batch | eager ms/step | graph ms/step | eager tok/s | graph tok/s | graph / eager |")
    print("|---|---|---|---|---|---|---|")
    for ctx in contexts:
        graphs = DecodeGraphs(model, storage, max_batch=max(batches), max_blocks=max_blocks)
        for b in batches:
            tables = [list(range(i * max_blocks, (i + 1) * max_blocks)) for i in range(b)]
            ids = list(range(1, b + 1))
            lens = [ctx] * b

            @torch.inference_mode()
            def eager() -> torch.Tensor:
                batch = StepBatch.build(tables, [1] * b, lens, b, bs, device="cuda")
                return model.head_logits(model.hidden_step(torch.tensor(ids, device="cuda"), storage, batch), float32=False)

            @torch.inference_mode()
            def graph() -> torch.Tensor:
                return graphs.run(ids, tables, lens)

            te = _timed(eager, args.reps)
            tg = _timed(graph, args.reps) if not reason else float("nan")
            print(f"| {ctx} | {b} | {te * 1e3:.2f} | {tg * 1e3:.2f} | {b / te:.0f} | {b / tg:.0f} | {tg / te:.2f} |")


if __name__ == "__main__":
    main()
