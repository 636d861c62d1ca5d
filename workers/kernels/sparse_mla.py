"""Sparse MLA over each query's selected latents, read in place from the paged cache (Triton).

Absorbed ("MQA") form of DSA: every query row has H heads of ``q_lat`` (q_nope with W_UK folded in, r
wide) and ``q_pe`` (p wide), and its own list of K selected positions. One program takes one row and
``BLOCK_H`` heads, walks the row's positions ``BLOCK_K`` at a time, gathers those latents
[c_kv | k_pe] through the block table, and keeps an online softmax (running max and sum in fp32), so
neither the [K, C] gathered latents nor the [H, K] probabilities reach memory. The output stays in
latent space [H, r] (W_UV is applied by the caller, ``MLA.unabsorb``).

Decode has few rows (one per sequence), so its K positions are split across programs (split-K, as in
flash-decoding); each split writes a normalized partial output and its log-sum-exp, and a small torch
step merges them. A prefill chunk has many rows and runs one split per row.

Shape legend: S query rows, H heads, r kv_lora_rank, p rope dims, C = r + p, K selected, NB cache blocks,
bs block size, W block-table width.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from workers.model.step_attention import _gathered_attention

_BLOCK_K = 32  # selected positions per iteration: one [BLOCK_K, C] latent tile
_BLOCK_H_MAX = 32  # heads per program: the [BLOCK_H, r] fp32 accumulator must fit in registers
_TARGET_PROGRAMS = 264  # about two programs per SM on an H100/H200 (132 SMs)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634


@triton.jit
def _sparse_mla_kernel(
    ql_ptr, qp_ptr, lat_ptr, table_ptr, seq_ptr, idx_ptr, out_ptr, lse_ptr,
    H, K, split_len, sm_scale_log2,
    stride_ls, stride_lh, stride_ps, stride_ph, stride_lb, stride_lo, stride_tr, stride_is,
    stride_os, stride_osp, stride_oh, stride_es, stride_esp,
    RANK: tl.constexpr, ROPE: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    LOW_PRECISION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row · stride overflows int32 for long prefill chunks
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    r = tl.arange(0, BLOCK_R)
    p = tl.arange(0, BLOCK_P)
    h_ok = h < H
    seq = tl.load(seq_ptr + row)
    q_lat = tl.load(ql_ptr + row * stride_ls + h[:, None] * stride_lh + r[None, :],
                    mask=h_ok[:, None] & (r[None, :] < RANK), other=0.0)
    q_pe = tl.load(qp_ptr + row * stride_ps + h[:, None] * stride_ph + p[None, :],
                   mask=h_ok[:, None] & (p[None, :] < ROPE), other=0.0)
    if not LOW_PRECISION:
        q_lat = q_lat.to(tl.float32)
        q_pe = q_pe.to(tl.float32)
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_R), dtype=tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, K)
    for k0 in range(start, end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        pos = tl.load(idx_ptr + row * stride_is + kk, mask=kk < end, other=-1)
        ok = pos >= 0
        blk = tl.load(table_ptr + seq * stride_tr + pos // PAGE, mask=ok, other=0)
        base = blk.to(tl.int64) * stride_lb + (pos % PAGE) * stride_lo
        c_kv = tl.load(lat_ptr + base[:, None] + r[None, :], mask=ok[:, None] & (r[None, :] < RANK), other=0.0)
        k_pe = tl.load(lat_ptr + base[:, None] + RANK + p[None, :], mask=ok[:, None] & (p[None, :] < ROPE), other=0.0)
        if not LOW_PRECISION:
            c_kv = c_kv.to(tl.float32)
            k_pe = k_pe.to(tl.float32)
        if LOW_PRECISION:
            s = tl.dot(q_lat, tl.trans(c_kv)) + tl.dot(q_pe, tl.trans(k_pe))  # [BLOCK_H, BLOCK_K] fp32
        else:  # float32 caches: full-precision products, not TF32
            s = tl.dot(q_lat, tl.trans(c_kv), input_precision="ieee")
            s += tl.dot(q_pe, tl.trans(k_pe), input_precision="ieee")
        s = tl.where(ok[None, :], s * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: keep exp2 away from inf - inf
        alpha = tl.exp2(m - m_safe)
        prob = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(prob, axis=1)
        if LOW_PRECISION:
            acc = acc * alpha[:, None] + tl.dot(prob.to(c_kv.dtype), c_kv)
        else:
            acc = acc * alpha[:, None] + tl.dot(prob, c_kv, input_precision="ieee")
        m = m_new
    has = l > 0.0
    o = acc / tl.where(has, l, 1.0)[:, None]
    lse = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))  # base 2
    tl.store(out_ptr + row * stride_os + split * stride_osp + h[:, None] * stride_oh + r[None, :],
             o.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & (r[None, :] < RANK))
    tl.store(lse_ptr + row * stride_es + split * stride_esp + h, lse, mask=h_ok)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def _launch(
    q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, block_tables: torch.Tensor,
    seq_of_row: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, scale: float, num_splits: int,
) -> torch.Tensor:
    """Run the kernel with ``num_splits`` splits of K per row and merge them → [S, H, r] in q's dtype."""
    s, h, rank = q_lat.shape
    rope = q_pe.shape[-1]
    k = idx.shape[1]
    if latent.stride(-1) != 1 or latent.shape[-1] != rank + rope:
        raise ValueError(f"latent cache must be [blocks, block_size, {rank + rope}] with a contiguous last dim")
    q_lat, q_pe = q_lat.contiguous(), q_pe.contiguous()
    pos = idx.masked_fill(~valid, -1).to(torch.int32).contiguous()  # -1: not selected
    split_len = max(_BLOCK_K, triton.cdiv(triton.cdiv(k, num_splits), _BLOCK_K) * _BLOCK_K)
    num_splits = max(1, triton.cdiv(k, split_len))
    part_dtype = q_lat.dtype if num_splits == 1 else torch.float32
    part = torch.empty(s, num_splits, h, rank, dtype=part_dtype, device=q_lat.device)
    lse = torch.empty(s, num_splits, h, dtype=torch.float32, device=q_lat.device)
    if s == 0:
        return part[:, 0]
    block_h = min(_BLOCK_H_MAX, _pow2(h))
    low = latent.dtype in (torch.bfloat16, torch.float16) and not _INTERPRET  # interpreter's bf16 dot is wrong
    grid = (s, triton.cdiv(h, block_h), num_splits)
    _sparse_mla_kernel[grid](
        q_lat, q_pe, latent, block_tables, seq_of_row, pos, part, lse,
        h, k, split_len, scale * _LOG2E,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), latent.stride(0), latent.stride(1),
        block_tables.stride(0), pos.stride(0), part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        RANK=rank, ROPE=rope, PAGE=latent.shape[1], BLOCK_H=block_h, BLOCK_R=_pow2(rank), BLOCK_P=_pow2(rope),
        BLOCK_K=_BLOCK_K, LOW_PRECISION=low, num_warps=8 if rank >= 256 else 4,  # 8 warps: [32, 512] fp32 accumulator
    )
    if num_splits == 1:
        return part[:, 0]
    # Merge splits: weights 2^(lse_i - max) renormalized; a split with no valid key has weight 0.
    top = lse.amax(dim=1, keepdim=True)
    weight = torch.exp2(lse - torch.where(torch.isfinite(top), top, 0.0))
    weight = weight / weight.sum(dim=1, keepdim=True).clamp(min=1e-30)
    return (part * weight[..., None]).sum(dim=1).to(q_lat.dtype)


def _num_splits(rows: int, heads: int, k: int) -> int:
    """Splits of K per decode row so the launch has about ``_TARGET_PROGRAMS`` programs."""
    programs = rows * triton.cdiv(heads, min(_BLOCK_H_MAX, _pow2(heads)))
    return max(1, min(triton.cdiv(_TARGET_PROGRAMS, programs), triton.cdiv(k, 4 * _BLOCK_K)))


def sparse_mla_decode(
    q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, block_tables: torch.Tensor,
    idx: torch.Tensor, valid: torch.Tensor, scale: float, num_splits: int | None = None,
) -> torch.Tensor:
    """One query per sequence over its selected latents (Triton, split-K).

    q_lat [B, H, r], q_pe [B, H, p]; latent [NB, bs, r+p] (the paged cache view); block_tables Long
    [B, W]; idx Long [B, K] positions in each sequence, valid bool [B, K]; scale the softmax scale
    (YaRN mscale included) → [B, H, r]. ``num_splits`` defaults to filling the GPU.
    """
    b, h, _ = q_lat.shape
    splits = num_splits or _num_splits(b, h, idx.shape[1])
    seq = torch.arange(b, dtype=torch.int32, device=q_lat.device)
    return _launch(q_lat, q_pe, latent, block_tables, seq, idx, valid, scale, splits)


def sparse_mla_prefill(
    q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, block_table: torch.Tensor,
    idx: torch.Tensor, valid: torch.Tensor, scale: float,
) -> torch.Tensor:
    """A chunk of S queries of one sequence, each over its own K selected latents (Triton).

    q_lat [S, H, r], q_pe [S, H, p]; latent [NB, bs, r+p]; block_table Long [W]; idx Long [S, K],
    valid bool [S, K]; scale → [S, H, r].
    """
    seq = torch.zeros(q_lat.shape[0], dtype=torch.int32, device=q_lat.device)
    return _launch(q_lat, q_pe, latent, block_table[None], seq, idx, valid, scale, 1)


class _Dims(NamedTuple):
    """What ``_gathered_attention`` reads of an MLA module."""

    rank: int
    scale: float


def gather_latents(latent: torch.Tensor, tables: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """latent [NB, bs, C], tables Long [S, W] (each row's own), idx Long [S, K] → [S, K, C]."""
    bs = latent.shape[1]
    blocks = tables.gather(1, (idx // bs).clamp(max=tables.shape[1] - 1))
    return latent[blocks, idx % bs]


def sparse_mla_decode_reference(
    q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, block_tables: torch.Tensor,
    idx: torch.Tensor, valid: torch.Tensor, scale: float, num_splits: int | None = None,
) -> torch.Tensor:
    """``sparse_mla_decode`` through the engine's PyTorch path (gather, then ``_gathered_attention``)."""
    sel = gather_latents(latent, block_tables, idx)
    return _gathered_attention(_Dims(q_lat.shape[-1], scale), q_lat, q_pe, sel, valid)


def sparse_mla_prefill_reference(
    q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, block_table: torch.Tensor,
    idx: torch.Tensor, valid: torch.Tensor, scale: float,
) -> torch.Tensor:
    """``sparse_mla_prefill`` through the engine's PyTorch path."""
    sel = gather_latents(latent, block_table[None].expand(idx.shape[0], -1), idx)
    return _gathered_attention(_Dims(q_lat.shape[-1], scale), q_lat, q_pe, sel, valid)


def sparse_mla_flops(rows: int, heads: int, k: int, rank: int, rope: int) -> int:
    """Multiply-adds × 2 of one call: scores (r + p) and output (r) per head per selected key."""
    return 2 * rows * heads * k * (2 * rank + rope)


__all__ = [
    "sparse_mla_decode", "sparse_mla_prefill", "sparse_mla_decode_reference", "sparse_mla_prefill_reference",
    "gather_latents", "sparse_mla_flops",
]
