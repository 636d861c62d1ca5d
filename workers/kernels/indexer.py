"""Lightning-indexer logits over the paged index keys (Triton), and top-k selection on them (torch).

One program scores one query row against one tile of ``BLOCK_T`` key positions of its sequence: it
gathers the tile's keys (FP8 or float) and per-token scales through the block table, computes the
per-head dot products [Hi, BLOCK_T] as one matrix product, and reduces
``Σ_h w[h] · ReLU(q[h] · k[t] · scale[t])`` over heads in registers, so the [S, Hi, T] per-head logits
never reach memory. Positions a row cannot see (past its own position: causal prefill; past its
sequence: decode padding) score ``-inf``; tiles wholly in the future skip the arithmetic.

Decode is S = number of sequences, one row each (``seq_of_row = arange``); a prefill chunk is S rows of
one sequence. Top-k then runs in torch on the logits, with the model's tie rule (earliest position wins),
so the selection matches ``Indexer.select``.

Shape legend: S query rows, Hi index heads, D index head dim, T key positions (padded), R sequences,
W block-table width, NB cache blocks, bs block size, K selected.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from workers.model.indexer import Indexer, IndexKeys, select_topk

_BLOCK_T = 64  # key positions per program: [Hi, BLOCK_T] logits stay in registers
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _index_logits_kernel(
    q_ptr, w_ptr, k_ptr, ks_ptr, table_ptr, seq_ptr, qpos_ptr, out_ptr,
    H, D, T,
    stride_qs, stride_qh, stride_ws, stride_kb, stride_ko, stride_sb, stride_so, stride_tr, stride_os,
    PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    LOW_PRECISION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row · stride overflows int32 for long prefill chunks
    tile = tl.program_id(1)
    seq = tl.load(seq_ptr + row)
    qpos = tl.load(qpos_ptr + row)
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = t < T
    visible = (t <= qpos) & in_range
    score = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    if tile * BLOCK_T <= qpos:  # a tile wholly past the query is all -inf: no loads, no math
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        hd_mask = (h[:, None] < H) & (d[None, :] < D)
        q = tl.load(q_ptr + row * stride_qs + h[:, None] * stride_qh + d[None, :], mask=hd_mask, other=0.0)
        w = tl.load(w_ptr + row * stride_ws + h, mask=h < H, other=0.0)
        blk = tl.load(table_ptr + seq * stride_tr + t // PAGE, mask=visible, other=0)
        off = t % PAGE
        k = tl.load(k_ptr + blk[:, None] * stride_kb + off[:, None] * stride_ko + d[None, :],
                    mask=visible[:, None] & (d[None, :] < D), other=0.0)
        scale = tl.load(ks_ptr + blk * stride_sb + off * stride_so, mask=visible, other=0.0)
        if LOW_PRECISION:
            # FP8 keys and FP8-rounded queries are exact in bf16: the products are exact, sums in fp32.
            logits = tl.dot(q.to(tl.bfloat16), tl.trans(k.to(tl.bfloat16)))
        else:
            logits = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")  # not TF32
        # scale is a positive power of two (or 1): ReLU commutes with it and the product is exact.
        logits = tl.maximum(logits * scale[None, :], 0.0)
        score = tl.where(visible, tl.sum(logits * w[:, None], axis=0), score)
    tl.store(out_ptr + row * stride_os + t, score, mask=in_range)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def paged_index_logits(
    q: torch.Tensor, w: torch.Tensor, index_k: torch.Tensor, index_scale: torch.Tensor,
    block_tables: torch.Tensor, seq_of_row: torch.Tensor, q_pos: torch.Tensor, num_keys: int,
) -> torch.Tensor:
    """Index scores of S query rows over their sequences' paged keys (Triton).

    q float32 [S, Hi, D] and w float32 [S, Hi] (``Indexer.queries``: weights and q's FP8 scale folded
    in); index_k [NB, bs, D] (float8_e4m3fn or float) and index_scale float32 [NB, bs] (cache views);
    block_tables Long [R, W]; seq_of_row Long [S] (row → block-table row); q_pos Long [S] (a row sees
    positions ≤ q_pos) → float32 [S, num_keys], ``-inf`` where not visible.
    """
    s, h, d = q.shape
    out = torch.empty(s, num_keys, dtype=torch.float32, device=q.device)
    if s == 0 or num_keys == 0:
        return out
    q, w = q.float().contiguous(), w.float().contiguous()
    if index_k.stride(-1) != 1:
        raise ValueError("index keys need a contiguous last dim")
    # bf16 products are exact only for FP8 inputs; float keys keep fp32 (and the interpreter's bf16 dot is wrong).
    low = index_k.dtype == torch.float8_e4m3fn and not _INTERPRET
    grid = (s, triton.cdiv(num_keys, _BLOCK_T))
    _index_logits_kernel[grid](
        q, w, index_k, index_scale, block_tables, seq_of_row, q_pos, out,
        h, d, num_keys,
        q.stride(0), q.stride(1), w.stride(0), index_k.stride(0), index_k.stride(1),
        index_scale.stride(0), index_scale.stride(1), block_tables.stride(0), out.stride(0),
        PAGE=index_k.shape[1], BLOCK_H=_pow2(h), BLOCK_D=_pow2(d), BLOCK_T=_BLOCK_T, LOW_PRECISION=low,
    )
    return out


def paged_index_logits_reference(
    q: torch.Tensor, w: torch.Tensor, index_k: torch.Tensor, index_scale: torch.Tensor,
    block_tables: torch.Tensor, seq_of_row: torch.Tensor, q_pos: torch.Tensor, num_keys: int,
) -> torch.Tensor:
    """Same arguments and result as ``paged_index_logits``, through ``Indexer.scores`` (PyTorch)."""
    nb = -(-num_keys // index_k.shape[1])
    tables = block_tables[seq_of_row, :nb]  # [S, nb]: each row reads its own sequence
    raw = index_k.view(torch.uint8) if index_k.element_size() == 1 else index_k  # fp8 gathers as bytes on every backend
    values = raw[tables].view(index_k.dtype).flatten(1, 2)[:, :num_keys]
    keys = IndexKeys(values, index_scale[tables].flatten(1, 2)[:, :num_keys])
    scores = Indexer.scores(q[:, None], w[:, None], keys)[:, 0]  # [S, T]
    visible = torch.arange(num_keys, device=q.device)[None] <= q_pos[:, None]
    return scores.masked_fill(~visible, -math.inf)


def select_from_logits(logits: torch.Tensor, q_pos: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (torch) of masked logits [S, T] → (idx Long [S, K], valid bool [S, K]), K = min(k, T);
    ties broken by the earlier position, as ``Indexer.select`` does (the same set; order within it is
    unspecified). No host synchronisation and no data-dependent shape: CUDA graphs capture it."""
    idx = topk_earliest(logits, k)
    return idx, idx <= q_pos[:, None]


def topk_earliest(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the min(k, T) largest of float32 logits [S, T], the earlier position winning ties →
    Long [S, K], unsorted.

    One int64 key per logit orders by (score, then earlier position): the score's IEEE bits, mapped to an
    integer of the same order, above the reversed position. ``Indexer``'s ``_topk_earliest_on_ties`` gets
    the same set with a fix-up pass for tied rows, which needs a host sync; this needs none.
    """
    t = logits.shape[-1]
    bits = (logits.float() + 0.0).contiguous().view(torch.int32).to(torch.int64)  # + 0.0: -0.0 ties +0.0
    # Negative floats order like sign-magnitude integers: flipping their magnitude bits makes them
    # order like two's complement (a larger magnitude becomes a smaller integer).
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    reverse = torch.arange(t - 1, -1, -1, device=logits.device)
    return ((ordered << 32) + reverse).topk(min(k, t), dim=-1, sorted=False).indices


def paged_index_topk(
    q: torch.Tensor, w: torch.Tensor, index_k: torch.Tensor, index_scale: torch.Tensor,
    block_tables: torch.Tensor, seq_of_row: torch.Tensor, q_pos: torch.Tensor, num_keys: int, k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indexer selection over paged keys: logits in Triton, top-k in torch. Arguments as
    ``paged_index_logits`` plus k → (idx Long [S, K] positions, valid bool [S, K])."""
    logits = paged_index_logits(q, w, index_k, index_scale, block_tables, seq_of_row, q_pos, num_keys)
    return select_from_logits(logits, q_pos, k)


def paged_index_topk_reference(
    q: torch.Tensor, w: torch.Tensor, index_k: torch.Tensor, index_scale: torch.Tensor,
    block_tables: torch.Tensor, seq_of_row: torch.Tensor, q_pos: torch.Tensor, num_keys: int, k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as ``paged_index_topk`` through the model's ``select_topk`` on reference scores."""
    scores = paged_index_logits_reference(q, w, index_k, index_scale, block_tables, seq_of_row, q_pos, num_keys)
    k_pos = torch.arange(num_keys, device=q.device)[None]
    idx, valid = select_topk(scores[None], q_pos[None], k_pos, k)
    return idx[0], valid[0]
