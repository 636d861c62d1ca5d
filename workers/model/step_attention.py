"""MLA + DSA over a ``StepBatch``: each query does the least work its context allows.

- A query that sees ≤ index_topk keys attends to all of them: DSA is dense causal attention there, so
  the indexer is skipped. A prefill chunk in that regime uses the non-absorbed "MHA" form (per-head
  keys and values expanded from the latents; fused scaled-dot-product attention), as DeepSeek's own
  inference code does for prefill.
- Beyond top-k the indexer selects; a slab of queries whose visible keys are few enough
  (``_dense_limit``: a cost model) scores them densely with the selection as a mask (no copies), a
  longer one gathers only the selected latents per query.
- Decode tokens of all sequences attend as one batch (absorbed "MQA" form over the latents).

Everything here must equal ``MLA.forward`` on a ``ContiguousKVCache`` (the reference path); the
tests compare them. Shape legend as in mla.py; N rows of the flat batch, L a sequence's context.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from workers import kernels

from .cache import EMPTY_POSITION
from .indexer import Indexer, IndexKeys
from .step import PagedLayers, StepBatch, read_batch_rows, read_rows

if TYPE_CHECKING:
    from .mla import MLA

_COPY_COST = 32  # multiply-adds one gathered value costs (measured on CPU: ~0.7 ns per value incl. its scoring vs ~0.02 ns per multiply-add in a large GEMM)
_SLAB_BUDGET = 1 << 22  # score elements of one query slab ([s', H, T'] floats)
_GATHER_BUDGET = 1 << 20  # gathered latent values of one query slab ([s', K, C])


def write_step(cache: PagedLayers, layer: int, batch: StepBatch, latent: torch.Tensor, keys: IndexKeys) -> None:
    """Store the step's N tokens: latent [N, C], keys of [N, D] at their slots."""
    b, o = batch.slot_blocks, batch.slot_offsets
    lat = cache.latent(layer)
    lat[b, o] = latent.to(lat.dtype)
    ik = cache.index_k(layer)
    ik[b, o] = keys.values.to(ik.dtype)
    cache.index_scale(layer)[b, o] = keys.scale


def attend_step(
    mla: "MLA", cache: PagedLayers, layer: int, batch: StepBatch, q_nope: torch.Tensor, q_pe: torch.Tensor,
    latent: torch.Tensor, index_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Attention of the N queries (cache already written). q_nope [N, H, n], q_pe [N, H, p],
    latent [N, C] (this step's, fresh), index_inputs (x, qr, cos, sin) rows for the indexer → [N, H, v]."""
    out = q_nope.new_empty(q_nope.shape[0], mla.n_heads, mla.v_dim)
    d = batch.num_decodes
    if d:
        out[:d] = _decode(mla, cache, layer, batch, q_nope[:d], q_pe[:d], index_inputs)
    for r in range(d, batch.num_seqs):
        a, z = batch.query_start[r], batch.query_start[r + 1]
        ctx = batch.context_lens[r]
        table = batch.block_tables[r]
        if ctx <= mla.topk:
            fresh = latent[a:z] if z - a == ctx else read_rows(cache.latent(layer), table, ctx)
            out[a:z] = _prefill_dense(mla, q_nope[a:z], q_pe[a:z], fresh)
        else:
            rows = tuple(t[a:z] for t in index_inputs)
            out[a:z] = _prefill_sparse(mla, cache, layer, table, ctx, q_nope[a:z], q_pe[a:z], rows)
    return out


def _prefill_dense(mla: "MLA", q_nope: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    """Dense causal MHA form: n queries at positions L-n .. L-1 over lat [L, C] → [n, H, v]."""
    n, L = q_nope.shape[0], lat.shape[0]
    c_kv, k_pe = lat.split([mla.rank, mla.rope], dim=-1)
    kv = mla.wkv_b(c_kv).view(L, mla.n_heads, mla.nope + mla.v_dim)
    k_nope, v = kv.split([mla.nope, mla.v_dim], dim=-1)
    q = torch.cat((q_nope, q_pe), dim=-1).transpose(0, 1)  # [H, n, n+p]
    k = torch.cat((k_nope, k_pe[:, None].expand(L, mla.n_heads, mla.rope)), dim=-1).transpose(0, 1)
    if n == L:
        o = F.scaled_dot_product_attention(q, k, v.transpose(0, 1), is_causal=True, scale=mla.scale)
    else:  # a chunk after a cached prefix: query i sees keys ≤ L - n + i
        mask = torch.ones(n, L, dtype=torch.bool, device=lat.device).tril(L - n)
        o = F.scaled_dot_product_attention(q, k, v.transpose(0, 1), attn_mask=mask, scale=mla.scale)
    return o.transpose(0, 1)


def _masked_attention(
    mla: "MLA", q_lat: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Absorbed attention with a key mask. q_lat [B, S, H, r], q_pe [B, S, H, p], lat [B, T, C],
    allowed bool [B, S, T] → [B, S, H, r]."""
    c_kv, k_pe = lat.split([mla.rank, mla.rope], dim=-1)
    b, s, h, _ = q_lat.shape
    scores = torch.matmul(q_lat.reshape(b, s * h, -1), c_kv.transpose(1, 2))
    scores = scores.baddbmm_(q_pe.reshape(b, s * h, -1), k_pe.transpose(1, 2)).view(b, s, h, -1)
    scores = scores.float().mul_(mla.scale).masked_fill_(~allowed[:, :, None], -math.inf)
    probs = scores.softmax(dim=-1).to(c_kv.dtype).view(b, s * h, -1)
    return torch.bmm(probs, c_kv).view(b, s, h, -1)


def _gathered_attention(
    mla: "MLA", q_lat: torch.Tensor, q_pe: torch.Tensor, sel: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Absorbed attention over each query's own K latents. q_lat [S, H, r], q_pe [S, H, p],
    sel [S, K, C], valid bool [S, K] → [S, H, r]."""
    # [q_lat | q_pe] against whole latents [c_kv | k_pe]: one pass over the gathered rows, not two.
    scores = torch.bmm(torch.cat((q_lat, q_pe), dim=-1), sel.transpose(1, 2))
    scores = scores.float().mul_(mla.scale).masked_fill_(~valid[:, None], -math.inf)
    return torch.bmm(scores.softmax(dim=-1).to(sel.dtype), sel[..., : mla.rank])


def _prefill_sparse(
    mla: "MLA", cache: PagedLayers, layer: int, table: torch.Tensor, ctx: int, q_nope: torch.Tensor,
    q_pe: torch.Tensor, index_rows: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """Queries at positions ctx-n .. ctx-1 of one sequence whose context exceeds top-k → [n, H, v]."""
    if kernels.available(q_nope):  # Triton reads the paged cache in place; below is the reference path
        from workers.kernels import attend

        return attend.prefill_sparse(mla, cache, layer, table, ctx, q_nope, q_pe, index_rows)
    n = q_nope.shape[0]
    lat = read_rows(cache.latent(layer), table, ctx)  # [L, C], read once for all queries
    keys = IndexKeys(read_rows(cache.index_k(layer), table, ctx), read_rows(cache.index_scale(layer), table, ctx))
    x, qr, cos, sin = (t[None] for t in index_rows)
    iq, iw = mla.indexer.queries(x, qr, cos, sin)
    q_pos = torch.arange(ctx - n, ctx, device=lat.device)[None]
    k_pos = torch.arange(ctx, device=lat.device)[None]
    idx, valid = Indexer.select(iq, iw, IndexKeys(keys.values[None], keys.scale[None]), q_pos, k_pos, mla.topk)
    idx, valid = idx[0], valid[0]
    q_lat = mla.absorb(q_nope)
    out = q_lat.new_empty(n, mla.n_heads, mla.rank)
    dense_upto = _dense_limit(mla)
    width = lat.shape[-1]
    gather_rows = max(1, _GATHER_BUDGET // (mla.topk * width))
    buffer = None  # one gather buffer for all slabs: a fresh one per slab was page-faulted every time
    lo = 0
    while lo < n:
        t_lo = ctx - n + lo + 1  # keys the slab's first query can see
        if t_lo <= dense_upto:
            hi = min(n, lo + max(1, _SLAB_BUDGET // (mla.n_heads * min(ctx, dense_upto))), n - (ctx - dense_upto))
            hi = max(hi, lo + 1)
            t_hi = ctx - n + hi  # keys the slab's last query can see
            # idx may point past t_hi at keys no query of the slab sees (invalid); indices are distinct per row.
            allowed = torch.zeros(hi - lo, ctx, dtype=torch.bool, device=lat.device).scatter_(1, idx[lo:hi], valid[lo:hi])
            out[lo:hi] = _masked_attention(mla, q_lat[None, lo:hi], q_pe[None, lo:hi], lat[None, :t_hi], allowed[None, :, :t_hi])[0]
        else:
            hi = min(n, lo + gather_rows)
            if buffer is None:
                buffer = lat.new_empty(gather_rows * idx.shape[1], width)
            pick = idx[lo:hi]
            sel = torch.index_select(lat, 0, pick.flatten(), out=buffer[: pick.numel()]).view(hi - lo, -1, width)
            out[lo:hi] = _gathered_attention(mla, q_lat[lo:hi], q_pe[lo:hi], sel, valid[lo:hi])
        lo = hi
    return mla.unabsorb(out)


def _dense_limit(mla: "MLA") -> int:
    """Context up to which masked dense scores beat gathering each query's top-k latents.

    Per query, dense scoring costs H·T·(2r + p) multiply-adds in one large GEMM; gathering copies K
    latents of C values (a copied value costs ``_COPY_COST`` multiply-adds) and scores them in
    small per-query GEMMs (about twice the cost per multiply-add)."""
    per_key = mla.n_heads * (2 * mla.rank + mla.rope)
    gather = mla.topk * (_COPY_COST * (mla.rank + mla.rope) + 2 * per_key)
    return max(mla.topk, gather // per_key)


def decode_lengths(batch: StepBatch, d: int) -> tuple[torch.Tensor, int]:
    """Context lengths Long [d] of the first d sequences, on the batch's device, and the key positions to
    scan: the longest context, or for a static-shape step (``batch.lens`` set) the block-table width."""
    if batch.lens is not None:  # no Python value may depend on this step's lengths: a graph replays it
        return batch.lens[:d], batch.block_tables.shape[1] * batch.block_size
    return torch.tensor(batch.context_lens[:d], device=batch.positions.device), max(batch.context_lens[:d])


def _decode(
    mla: "MLA", cache: PagedLayers, layer: int, batch: StepBatch, q_nope: torch.Tensor, q_pe: torch.Tensor,
    index_inputs: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """One query per sequence (rows and sequences 0 .. d-1), batched → [d, H, v]."""
    if kernels.available(q_nope):  # Triton reads the paged cache in place; below is the reference path
        from workers.kernels import attend

        return attend.decode(mla, cache, layer, batch, q_nope, q_pe, index_inputs)
    d = q_nope.shape[0]
    lens, t_max = decode_lengths(batch, d)
    tables = batch.block_tables[:d]
    lat = read_batch_rows(cache.latent(layer), tables, t_max)  # [d, T, C]
    t = lat.shape[1]
    k_pos = torch.arange(t, device=lat.device).expand(d, t)
    visible = k_pos < lens[:, None]  # [d, T]
    q_lat = mla.absorb(q_nope)  # [d, H, r]
    if t_max <= mla.topk:
        out = _masked_attention(mla, q_lat[:, None], q_pe[:, None], lat, visible[:, None])[:, 0]
        return mla.unabsorb(out)
    keys = IndexKeys(read_batch_rows(cache.index_k(layer), tables, t_max),
                     read_batch_rows(cache.index_scale(layer), tables, t_max))
    x, qr, cos, sin = (v[:d, None] for v in index_inputs)
    iq, iw = mla.indexer.queries(x, qr, cos, sin)  # [d, 1, Hi, D], [d, 1, Hi]
    q_pos = (lens - 1)[:, None]
    k_pos = k_pos.masked_fill(~visible, EMPTY_POSITION)
    idx, valid = Indexer.select(iq, iw, keys, q_pos, k_pos, mla.topk)  # [d, 1, K]
    if t <= _dense_limit(mla):
        allowed = torch.zeros(d, t, dtype=torch.bool, device=lat.device).scatter_(1, idx[:, 0], valid[:, 0])
        out = _masked_attention(mla, q_lat[:, None], q_pe[:, None], lat, allowed[:, None])[:, 0]
    else:
        sel = lat[torch.arange(d, device=lat.device)[:, None], idx[:, 0]]  # [d, K, C]: each row's own K
        out = _gathered_attention(mla, q_lat, q_pe, sel, valid[:, 0])
    return mla.unabsorb(out)
