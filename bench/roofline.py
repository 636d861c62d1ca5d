"""Roofline: this machine's own limits (matmul peak, copy bandwidth) vs dsaserve's prefill and decode.

    .venv/bin/python -m bench.roofline [--quick] [--reps N] [--dtype float32|bfloat16]

1. Limits, measured here: ``torch.mm`` 2048³ GFLOP/s in float32 and bfloat16, and the bandwidth of a
   1 GiB tensor copy into a preallocated tensor (GB/s of bytes read + written).
2. Prefill: one fresh 4096-token prompt (``max_tokens=1``) through ``LocalBackend`` (one engine), its
   analytic model FLOPs (``common.prefill_flops``) per second as a share of the matmul peak in the dtype
   the model runs in.
3. Decode: 64 sequences with 256-token prompts submitted at once; the steady-state step is measured
   while all 64 are decoding (after the last one's first token, before the first one finishes). Its
   ideal time is the larger of the memory bound — the bytes a step must read (below) at the measured
   copy bandwidth — and the compute bound — 64 × the analytic FLOPs of one decode token at the
   window's mean context at the matmul peak. Reported: achieved / ideal.

Bytes a decode step must read, as counted here: every weight of the checkpoint's main layers once
(attention, indexer, dense MLP, router, shared experts and *all* routed experts — with 64 sequences
× top-k routing practically every expert is hit; the expected number for uniform routing is
printed), the final norm and the whole lm_head, but only the batch's rows of the embedding table and
not the MTP layer (not loaded); weights in the compute dtype. Plus, per sequence and layer, the KV the
attention needs: at context T > index_topk the indexer keys of all T positions (fp8 when the model
runs in bf16, float32 otherwise: the engine's default indexer) and the index_topk selected latents
(kv_lora_rank + qk_rope_head_dim in the compute dtype); at T ≤ index_topk the T latents. Activations
and the new token's KV write are not counted. The same checkpoint as the other benchmarks (``tiny``,
real vocabulary, stored bf16).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import torch

from bench import common as C


def weight_bytes(path: Path, config, dtype: torch.dtype, batch: int) -> dict[str, float]:
    """Bytes of the weights one decode step of ``batch`` sequences reads (see the module docstring),
    from the checkpoint's tensor shapes (safetensors headers)."""
    from safetensors import safe_open

    size = torch.empty((), dtype=dtype).element_size()
    parts = {"embedding rows": 0.0, "attention + indexer": 0.0, "dense MLP": 0.0, "MoE (router + all experts)": 0.0,
             "lm_head + final norm": 0.0}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                numel = 1
                for d in f.get_slice(name).get_shape():
                    numel *= d
                if name.startswith("model.layers."):
                    layer = int(name.split(".")[2])
                    if layer >= config.num_hidden_layers:
                        continue  # MTP layer: not loaded for serving
                    if ".mlp." not in name:
                        key = "attention + indexer"
                    elif config.is_moe_layer(layer):
                        key = "MoE (router + all experts)"
                    else:
                        key = "dense MLP"
                    parts[key] += numel * size
                elif "embed_tokens" in name:
                    parts["embedding rows"] += batch * config.hidden_size * size
                else:
                    parts["lm_head + final norm"] += numel * size
    parts["total"] = sum(parts.values())
    return parts


def kv_bytes_per_seq(config, context: float, dtype: torch.dtype) -> float:
    """KV bytes one sequence's decode step reads across all layers at ``context`` tokens (module docstring)."""
    size = torch.empty((), dtype=dtype).element_size()
    index_size = 4 if dtype == torch.float32 else 1
    if context > config.index_topk:
        per_layer = context * config.index_head_dim * index_size + config.index_topk * config.latent_dim * size
    else:
        per_layer = context * config.latent_dim * size
    return config.num_hidden_layers * per_layer


def prefill_once(backend, n: int, seed: int) -> float:
    from workers.engine.types import GenerateRequest, SamplingParams

    req = GenerateRequest(f"roof-prefill-{seed}", tuple(C.random_ids(n, seed)), SamplingParams(max_tokens=1, ignore_eos=True))

    async def go() -> float:
        t0 = time.perf_counter()
        ids, _ = await C.stream_tokens(backend, req)
        assert len(ids) == 1
        return time.perf_counter() - t0

    return C.run_async(go())


def decode_batch(backend, batch: int, prompt_len: int, new: int, seed: int) -> tuple[float, float, int]:
    """Submit ``batch`` fresh prompts at once → (steady-state seconds per step, mean context during the
    window, steps in the window). Window: from the moment every sequence has its first token to the
    moment the first sequence has its last; each step emits one token per sequence."""
    from workers.engine.types import GenerateRequest, SamplingParams

    params = SamplingParams(max_tokens=new, ignore_eos=True)
    reqs = [GenerateRequest(f"roof-dec-{seed}-{j}", tuple(C.random_ids(prompt_len, seed * 1000 + j)), params)
            for j in range(batch)]

    async def go():
        return await asyncio.gather(*(C.stream_tokens(backend, r) for r in reqs))

    outs = C.run_async(go())
    stamps = [s for _, s in outs]
    assert all(len(s) == new for s in stamps)
    t_a = max(s[0] for s in stamps)
    t_b = min(s[-1] for s in stamps)
    steps = sorted(sum(t_a < x <= t_b for x in s) for s in stamps)[batch // 2]
    if steps < 2 or t_b <= t_a:
        raise RuntimeError(f"no steady-state window: the {batch} sequences never all decoded together "
                           f"(raise the new-token count, {new})")
    # context of each sequence at the window's middle: prompt + tokens it had by then
    mid = (t_a + t_b) / 2
    ctx = sum(prompt_len + sum(x <= mid for x in s) for s in stamps) / batch
    return (t_b - t_a) / steps, ctx, steps


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0], C.add_dtype_arg)
    C.setup_threads(args.threads)
    dtype_name = args.dtype or C.default_dtype_name()
    dtype = C.DTYPES[dtype_name]
    quick = args.quick
    mm_n, copy_mib = (1024, 256) if quick else (2048, 1024)
    prefill_len = 512 if quick else 4096
    batch, prompt_len, new = (16, 64, 16) if quick else (64, 256, 64)
    reps = args.reps or (1 if quick else 3)
    path = C.checkpoint(vocab=args.vocab)
    config = C.model_config(vocab=args.vocab)
    C.print_header(f"Roofline ({dtype_name}): matmul and copy limits vs a {prefill_len}-token prefill and decode at batch {batch}")
    flags = sorted(C.cpu_flags() & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    print(f"CPU flags of note: {', '.join(flags) or 'none'}; model: `tiny` preset, vocab {config.vocab_size}, weights in "
          f"{dtype_name} (stored bf16), index_topk {config.index_topk}, indexer: engine default "
          f"({'exact fp32' if dtype == torch.float32 else 'fp8'})  ", flush=True)

    # 1. limits, measured in a process of their own with the engine's thread count (bench.hf_peer)
    from bench.hf_peer import HFPeer

    probe = HFPeer(None, dtype_name, args.threads)
    peak = {name: [] for name in C.DTYPES}
    bw: list[float] = []
    for _ in range(reps):
        for name in C.DTYPES:
            C.wait_quiet()
            peak[name] += probe.call(op="matmul", dtype=name, n=mm_n, reps=3)["gflops"]
        C.wait_quiet()
        bw += probe.call(op="copy", mib=copy_mib, reps=3)["gbs"]
    probe.close()
    peak_m = {k: C.median(v) for k, v in peak.items()}
    bw_m = C.median(bw)
    print("\n### Machine limits\n")
    print(C.markdown_table(["measure", "median (min–max, n)"], [
        *[[f"`torch.mm` {mm_n}³, {k}, GFLOP/s", C.fmt_times(v, digits=1)] for k, v in peak.items()],
        [f"copy of a {copy_mib} MiB float32 tensor, GB/s read + write", C.fmt_times(bw, digits=1)],
    ]))

    from workers.engine.config import EngineConfig

    backend = C.start_local(path, EngineConfig(), dtype=dtype, disaggregate=False)
    try:
        # 2. prefill
        prefill_once(backend, prefill_len, 80_999)  # warm-up
        pt = []
        for r in range(reps):
            C.wait_quiet()
            pt.append(prefill_once(backend, prefill_len, 81_000 + r))
        # 3. decode
        decode_batch(backend, batch, prompt_len, new, 90)  # warm-up
        dec = []
        for r in range(reps):
            C.wait_quiet()
            dec.append(decode_batch(backend, batch, prompt_len, new, 91 + r))
    finally:
        backend.close()

    flops = C.prefill_flops(config, prefill_len)["total"]
    t = C.median(pt)
    print("\n### Prefill\n")
    print(C.markdown_table(
        ["prompt tokens", "TTFT seconds: median (min–max, n)", "model GFLOP", "model GFLOP/s", f"% of {dtype_name} matmul peak"],
        [[prefill_len, C.fmt_times(pt), f"{flops / 1e9:.3f}", f"{flops / t / 1e9:.1f}", f"{100 * flops / t / 1e9 / peak_m[dtype_name]:.1f} %"]]))
    print(f"\nMatmul peak in {dtype_name}: {peak_m[dtype_name]:.1f} GFLOP/s; the prefill would take "
          f"{flops / peak_m[dtype_name] / 1e9:.3f} s at it.")

    step = C.median([d[0] for d in dec])
    ctx = C.median([d[1] for d in dec])
    w = weight_bytes(path, config, dtype, batch)
    kv = batch * kv_bytes_per_seq(config, ctx, dtype)
    total_bytes = w["total"] + kv
    mem_s = total_bytes / (bw_m * 1e9)
    step_flops = batch * C.prefill_flops(config, 1, cached=round(ctx))["total"]
    comp_s = step_flops / (peak_m[dtype_name] * 1e9)
    ideal = max(mem_s, comp_s)
    experts_hit = config.n_routed_experts * (1 - (1 - config.num_experts_per_tok / config.n_routed_experts) ** batch)
    print("\n### Decode step\n")
    print(C.markdown_table(
        ["batch", "mean context", "step ms: median (min–max, n)", "tokens/s", "MB read / step", "memory-bound ms",
         "GFLOP / step", "compute-bound ms", "achieved / ideal"],
        [[batch, f"{ctx:.0f}", C.fmt_times([d[0] for d in dec], 1e-3, 2), f"{batch / step:.0f}",
          f"{total_bytes / 1e6:.1f}", f"{1e3 * mem_s:.2f}", f"{step_flops / 1e9:.3f}", f"{1e3 * comp_s:.2f}",
          f"{step / ideal:.1f}× ({'memory' if mem_s >= comp_s else 'compute'}-bound ideal {1e3 * ideal:.2f} ms)"]]))
    print(f"\nSteps in the steady-state window: {', '.join(str(d[2]) for d in dec)} (one per repetition).")
    print("\nBytes read per step (MB):\n")
    print(C.markdown_table(["part", "MB"], [[k, f"{v / 1e6:.2f}"] for k, v in w.items() if k != "total"]
                           + [[f"KV: {batch} sequences × {ctx:.0f} tokens × {config.num_hidden_layers} layers", f"{kv / 1e6:.2f}"],
                              ["**total**", f"**{total_bytes / 1e6:.2f}**"]]))
    print(f"\nRouted experts hit per MoE layer and step for uniform routing: {experts_hit:.1f} of {config.n_routed_experts} "
          "(all are counted). Ideal = max(bytes / copy bandwidth, FLOPs / matmul peak); copy bandwidth is DRAM's: a "
          "model whose weights fit in L3 can beat the memory bound.")
    C.print_footer()


if __name__ == "__main__":
    main()
