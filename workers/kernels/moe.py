"""Fused routed experts (Triton): two grouped GEMMs over tokens aligned by expert, capturable in a CUDA graph.

The PyTorch reference is ``MoE.routed`` (``workers/model/moe.py``): it sorts the (token, expert) pairs by
expert, reads the per-expert counts back to the host (``.tolist()``) and loops over the active experts in
Python, one GEMM chain each. That host sync makes it uncapturable in a CUDA graph, and a layer with 256
experts costs hundreds of launches. Here the whole routed part is a fixed sequence of launches whose
shapes and grids depend only on (N, k, E, D, I), never on the routing:

1. ``align_by_expert`` (torch, no host sync): the N·k slots (slot = token·k + j, the flat index into
   ``ids``) are ordered by expert, and each expert's run is padded to a multiple of ``BLOCK_M``, so every
   ``BLOCK_M`` rows of the ordered list belong to one expert. Padding holds the sentinel N·k; the number
   of blocks is an upper bound on the padded total, and blocks past the used total have expert -1.
2. One grouped-GEMM kernel, launched twice. A program takes one m-block and one tile of output columns,
   reads the block's expert, and multiplies the block's rows by that expert's weight tile:
   - first GEMM, gated: rows of x (``slot // k``) times w1ᵀ and w3ᵀ into two float32 accumulators,
     ``silu(g) · u`` stored per slot into the intermediate [N·k, I];
   - second GEMM: rows of the intermediate (``slot``) times w2ᵀ, scaled by the slot's routing weight,
     stored per slot into float32 [N·k, D].
   FP8 weights (block-quantized, ``workers.model.fp8``) are converted in-kernel and scaled by their
   per-block ``scale_inv``: when the K tile lies inside one scale block (the usual 128 × 128 case), the
   partial product of a K tile is scaled per output column; otherwise each weight element is scaled.
3. ``y.view(N, k, D).sum(1)`` (torch) adds each token's k contributions.

Shape legend: N tokens, k experts per token, E experts, D hidden size, I expert intermediate size,
M = N·k slots, P padded slots (multiple of BLOCK_M), (bo, bi) the FP8 block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import nn

from workers.model.fp8 import FP8Linear
from workers.model.moe import MLP, MoE

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SMEM_BUDGET = 160 * 1024  # of an H100/H200's 227 KiB per block: room for the epilogue's layout conversion


@dataclass(frozen=True)
class StackedExperts:
    """The routed experts' weights stacked along a leading expert axis.

    w1, w3: [E, I, D]; w2: [E, D, I] — one float dtype, or float8_e4m3fn with float32 block scales
    ``w1_scale``/``w3_scale`` [E, ceil(I/bo), ceil(D/bi)] and ``w2_scale`` [E, ceil(D/bo), ceil(I/bi)]
    (None for float weights). ``block`` is the FP8 block (bo, bi); (0, 0) for float weights.
    w1 and w3 stay separate: stacked on the out dim, an I that is not a multiple of bo would put w3's
    rows across w1's last scale block.
    """

    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor
    w1_scale: torch.Tensor | None
    w3_scale: torch.Tensor | None
    w2_scale: torch.Tensor | None
    block: tuple[int, int]

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    @property
    def fp8(self) -> bool:
        return self.w1_scale is not None


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[E] tensors of one shape → [E, ...]: a view of their storage when they already are consecutive
    slices of one contiguous stack (a second ``stack_experts``), else a fresh copy."""
    t0 = tensors[0].detach()
    size = t0.numel()
    same_storage = t0.is_contiguous() and all(
        t.is_contiguous() and t.dtype == t0.dtype and t.shape == t0.shape
        and t.untyped_storage().data_ptr() == t0.untyped_storage().data_ptr()
        and t.storage_offset() == t0.storage_offset() + e * size
        for e, t in enumerate(tensors)
    )
    if same_storage:
        return t0.as_strided((len(tensors), *t0.shape), (size, *t0.stride()), t0.storage_offset())
    return torch.stack([t.detach() for t in tensors])


def stack_experts(moe: MoE) -> StackedExperts | None:
    """Stack ``moe``'s routed experts for ``fused_moe``, and make the experts read the stack.

    The experts must all be ``MLP`` with bias-free ``nn.Linear`` projections of one dtype, or all with
    ``FP8Linear`` of one block; otherwise (an ``AbsentExpert``: expert parallel, the expert lives on
    another rank; mixed kinds, dtypes or devices) → None and nothing changes. Each projection is stacked
    into a new tensor, then every expert's weight (and FP8 ``weight_scale_inv``) is replaced by its view
    into the stack, so the old per-expert tensors are freed (no doubled memory; the peak is one
    projection's worth) and ``MoE.routed`` keeps working on the same storage. Calling it again finds
    the views and returns the same stack without copying.
    """
    experts = list(moe.experts)
    if not experts or not all(isinstance(m, MLP) for m in experts):
        return None
    projections = [m.w1 for m in experts] + [m.w3 for m in experts] + [m.w2 for m in experts]
    fp8 = isinstance(projections[0], FP8Linear)
    kind = FP8Linear if fp8 else nn.Linear
    if not all(type(p) is kind for p in projections):
        return None
    if not fp8 and any(p.bias is not None for p in projections):
        return None
    weights = [p.weight for p in projections]
    if len({(w.dtype, w.device) for w in weights}) != 1:
        return None
    if fp8 and len({p.block for p in projections}) != 1:
        return None
    if not fp8 and not weights[0].is_floating_point():
        return None
    for name in ("w1", "w3", "w2"):
        if len({getattr(m, name).weight.shape for m in experts}) != 1:
            return None

    stacked: dict[str, torch.Tensor | None] = {}
    with torch.no_grad():
        for name in ("w1", "w3", "w2"):
            layers = [getattr(m, name) for m in experts]
            stack = _stack([p.weight for p in layers])
            scale = _stack([p.weight_scale_inv.float() for p in layers]) if fp8 else None
            for e, p in enumerate(layers):
                p.weight = nn.Parameter(stack[e], requires_grad=False)
                if fp8:
                    p.weight_scale_inv = scale[e]
            stacked[name], stacked[f"{name}_scale"] = stack, scale
    block = tuple(projections[0].block) if fp8 else (0, 0)
    return StackedExperts(block=block, **stacked)


def padded_slots(num_slots: int, num_experts: int, block_m: int) -> int:
    """P: an upper bound on Σ_e ceil(count_e / block_m) · block_m over any routing of ``num_slots``
    slots, rounded to a multiple of block_m. At most min(E, M) experts are non-empty, each padding
    fewer than block_m rows."""
    bound = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the slots of ``ids`` by expert, each expert's run padded to a multiple of ``block_m``.

    ids Long [N, k] → (sorted_slots Long [P], block_expert Long [P // block_m]), P = ``padded_slots(N·k,
    E, block_m)``. Slot s = token·k + j indexes ``ids.flatten()``. Each expert's slots are contiguous
    (ascending: the sort is stable), start at a multiple of block_m, and are followed by the sentinel
    N·k up to the next multiple; ``block_expert[b]`` is the expert of rows [b·block_m, (b+1)·block_m),
    or -1 past the used total. No host sync, and output shapes depend only on (N, k, E, block_m): safe
    to capture in a CUDA graph.
    """
    flat = ids.flatten()
    m = flat.numel()
    p = padded_slots(m, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.long, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # not bincount: it reads the max back to size its output
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = flat.argsort(stable=True)  # slots by expert
    expert = flat[order]
    rank = torch.arange(m, device=ids.device) - (counts.cumsum(0) - counts)[expert]  # position within expert
    dest = (padded_end - padded)[expert] + rank
    sorted_slots = torch.full((p,), m, dtype=torch.long, device=ids.device)
    sorted_slots.scatter_(0, dest, order)
    block_start = torch.arange(0, p, block_m, device=ids.device)
    # The expert whose padded run holds the block's first row: empty experts have end == previous end.
    owner = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(owner < num_experts, owner, torch.full_like(owner, -1))
    return sorted_slots, block_expert


@triton.jit
def _accumulate(acc, a, w_ptrs, s_ptr, s_col, s_el, w_mask, n_ok,
                FP8: tl.constexpr, TILE_SCALE: tl.constexpr, LOW_PRECISION: tl.constexpr):
    """acc [BM, BN] += a [BM, BK] · the weight tile [BK, BN] at ``w_ptrs``; FP8 weights scaled by their
    block scale from ``s_ptr``: per column (offsets ``s_col`` [BN]) when TILE_SCALE (the K tile lies in
    one scale block), else per element (offsets ``s_el`` [BK, BN])."""
    w = tl.load(w_ptrs, mask=w_mask, other=0.0)
    if FP8 and not TILE_SCALE:
        w = w.to(tl.float32) * tl.load(s_ptr + s_el, mask=w_mask, other=0.0)
    if LOW_PRECISION:
        part = tl.dot(a, w.to(a.dtype))  # e4m3 is exact in bf16/fp16; float weights have a's dtype
    else:
        # fp32 (or the interpreter, whose bf16 dot is wrong): IEEE products, not TF32.
        part = tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    if FP8 and TILE_SCALE:
        part = part * tl.load(s_ptr + s_col, mask=n_ok, other=0.0)[None, :]
    return acc + part


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, v_ptr, ws_ptr, vs_ptr, out_ptr, slots_ptr, block_expert_ptr, route_ptr,
    num_slots, row_div, N, K, scale_bo, scale_bi,
    stride_am, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GATED: tl.constexpr, FP8: tl.constexpr, TILE_SCALE: tl.constexpr, ROUTED: tl.constexpr,
    LOW_PRECISION: tl.constexpr,
):
    """One (m-block, n-tile) of ``out[slot] = f(a[slot // row_div] · W_eᵀ)`` for the block's expert e.

    GATED: f = silu(a·w1ᵀ) · (a·w3ᵀ), with w = w_ptr (w1) and v = v_ptr (w3); else out = a·wᵀ, times the
    slot's routing weight when ROUTED. Weights [E, N, K] share strides (and their scales, [E, ·, ·]).
    """
    b = tl.program_id(0)
    e = tl.load(block_expert_ptr + b)
    if e >= 0:  # blocks past the used total: nothing to do (e is int64: e · stride_we overflows int32)
        slot = tl.load(slots_ptr + b * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = slot < num_slots
        row = slot // row_div
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        kk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + row[:, None] * stride_am + kk[None, :]
        w_off = e * stride_we + n[None, :].to(tl.int64) * stride_wn + kk[:, None] * stride_wk  # [BK, BN]
        s_row = e * stride_se + (n // scale_bo) * stride_sn
        acc_w = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_v = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + kk) < K
            a = tl.load(a_ptrs + k0, mask=valid[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & n_ok[None, :]
            w_tile = w_off + k0 * stride_wk
            s_col = s_row + (k0 // scale_bi) * stride_sk  # [BN]
            s_el = s_row[None, :] + ((k0 + kk) // scale_bi)[:, None] * stride_sk  # [BK, BN]
            acc_w = _accumulate(acc_w, a, w_ptr + w_tile, ws_ptr, s_col, s_el, w_mask, n_ok,
                                FP8, TILE_SCALE, LOW_PRECISION)
            if GATED:
                acc_v = _accumulate(acc_v, a, v_ptr + w_tile, vs_ptr, s_col, s_el, w_mask, n_ok,
                                    FP8, TILE_SCALE, LOW_PRECISION)
        if GATED:
            result = acc_w * tl.sigmoid(acc_w) * acc_v
        else:
            result = acc_w
            if ROUTED:
                result = result * tl.load(route_ptr + slot, mask=valid, other=0.0)[:, None]
        out_ptrs = out_ptr + slot[:, None] * stride_om + n[None, :]
        tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class _Tiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _tiles(num_slots: int, num_experts: int, stack: StackedExperts) -> _Tiles:
    """Tile sizes from shapes only (the grid must not depend on the routing)."""
    if _INTERPRET:
        return _Tiles(16, 16, 16, 1, 1)  # small: the interpreter runs every program in numpy
    per_expert = num_slots / max(1, min(num_experts, num_slots))  # rows an active expert gets on average
    block_m = 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64
    block_n = 64 if block_m <= 32 else 128
    # FP8: a K tile inside one 128-wide scale block takes one scale per column; bf16 weights: 64 keeps
    # three stages of the gated GEMM's two weight tiles within shared memory.
    block_k = 128 if stack.fp8 else 64
    return _Tiles(block_m, block_n, block_k, num_warps=8 if block_m == 64 else 4, num_stages=3)


def _launch(a, w, v, ws, vs, out, slots, block_expert, route, row_div, block, tiles: _Tiles, gated: bool):
    """Grid (P / BLOCK_M, ceil(out cols / BLOCK_N)) over ``_grouped_gemm_kernel``; w [E, N, K]."""
    _, n_out, k_dim = w.shape
    fp8 = ws is not None
    bo, bi = block if fp8 else (1, 1)
    tile_scale = fp8 and bi % tiles.block_k == 0
    low = a.dtype in (torch.bfloat16, torch.float16) and not _INTERPRET
    ws_arg = ws if fp8 else w  # unread without FP8: any pointer
    vs_arg = vs if fp8 else w
    s_strides = ws.stride() if fp8 else (0, 0, 0)
    # Pipeline stages that fit shared memory: fp32 operands at the largest tiles allow only two.
    weight_tiles = (2 if gated else 1) * tiles.block_n * w.element_size()
    stage_bytes = tiles.block_k * (tiles.block_m * a.element_size() + weight_tiles)
    num_stages = max(1, min(tiles.num_stages, _SMEM_BUDGET // stage_bytes))
    grid = (slots.numel() // tiles.block_m, triton.cdiv(n_out, tiles.block_n))
    _grouped_gemm_kernel[grid](
        a, w, v if gated else w, ws_arg, vs_arg if gated else ws_arg, out, slots, block_expert,
        route if route is not None else out,  # unread unless routed
        out.shape[0], row_div, n_out, k_dim, bo, bi,
        a.stride(0), w.stride(0), w.stride(1), w.stride(2), *s_strides, out.stride(0),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        GATED=gated, FP8=fp8, TILE_SCALE=tile_scale, ROUTED=route is not None, LOW_PRECISION=low,
        num_warps=tiles.num_warps, num_stages=num_stages,
    )


def fused_moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, stack: StackedExperts) -> torch.Tensor:
    """Routed experts, fused: x [N, D], weights float32 [N, k], ids Long [N, k] → Σ_j weights[:, j] ·
    E_{ids[:, j]}(x) as [N, D] in x's dtype. Same result as ``MoE.routed`` up to rounding (float32
    accumulation throughout; the k contributions are summed in slot order). No host sync; launches and
    grids depend only on shapes, so it can be captured in a CUDA graph.
    """
    n, k = ids.shape
    d = x.shape[1]
    if n == 0:
        return x.new_empty(0, d)
    m = n * k
    num_experts, inter, _ = stack.w1.shape
    tiles = _tiles(m, num_experts, stack)
    slots, block_expert = align_by_expert(ids, num_experts, tiles.block_m)
    x = x.contiguous()
    route = weights.float().contiguous()
    h = torch.empty(m, inter, dtype=x.dtype, device=x.device)
    _launch(x, stack.w1, stack.w3, stack.w1_scale, stack.w3_scale, h, slots, block_expert, None, k,
            stack.block, tiles, gated=True)
    y = torch.empty(m, d, dtype=torch.float32, device=x.device)
    _launch(h, stack.w2, None, stack.w2_scale, None, y, slots, block_expert, route, 1,
            stack.block, tiles, gated=False)
    return y.view(n, k, d).sum(1).to(x.dtype)
