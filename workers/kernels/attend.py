"""The engine's DSA attention through the Triton kernels: indexer logits and sparse MLA read the paged
cache in place (no per-sequence copies of latents or index keys).

Drop-in for ``step_attention._decode`` and ``step_attention._prefill_sparse`` (same arguments, same
results up to rounding); ``step_attention`` calls these when ``workers.kernels.available`` says so.
Selection: the kernel computes the logits, top-k runs in torch with the model's tie rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from workers.model.step import PagedLayers, StepBatch
from workers.model.step_attention import decode_lengths

from .indexer import paged_index_logits, select_from_logits
from .sparse_mla import sparse_mla_decode, sparse_mla_prefill

if TYPE_CHECKING:
    from workers.model.mla import MLA

_LOGIT_BUDGET = 1 << 26  # float32 index logits of one prefill slab [rows, ctx] (256 MiB)


def decode(
    mla: "MLA", cache: PagedLayers, layer: int, batch: StepBatch, q_nope: torch.Tensor, q_pe: torch.Tensor,
    index_inputs: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """One query per sequence (rows and sequences 0 .. d-1) → [d, H, v]."""
    d = q_nope.shape[0]
    dev = q_nope.device
    lens, t_max = decode_lengths(batch, d)
    tables = batch.block_tables[:d]
    if t_max <= mla.topk:  # every visible position is selected: dense MLA as a sparse list
        idx = torch.arange(t_max, device=dev).expand(d, t_max)
        valid = idx < lens[:, None]
    else:
        x, qr, cos, sin = (v[:d, None] for v in index_inputs)
        iq, iw = mla.indexer.queries(x, qr, cos, sin)  # [d, 1, Hi, D], [d, 1, Hi]
        q_pos = lens - 1
        logits = paged_index_logits(iq[:, 0], iw[:, 0], cache.index_k(layer), cache.index_scale(layer), tables,
                                    torch.arange(d, device=dev), q_pos, t_max)
        idx, valid = select_from_logits(logits, q_pos, mla.topk)
    out = sparse_mla_decode(mla.absorb(q_nope), q_pe, cache.latent(layer), tables, idx, valid, mla.scale)
    return mla.unabsorb(out)


def prefill_sparse(
    mla: "MLA", cache: PagedLayers, layer: int, table: torch.Tensor, ctx: int, q_nope: torch.Tensor,
    q_pe: torch.Tensor, index_rows: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """Queries at positions ctx-n .. ctx-1 of one sequence whose context exceeds top-k → [n, H, v]."""
    n = q_nope.shape[0]
    dev = q_nope.device
    x, qr, cos, sin = (t[None] for t in index_rows)
    iq, iw = mla.indexer.queries(x, qr, cos, sin)  # [1, n, Hi, D], [1, n, Hi]
    q_pos = torch.arange(ctx - n, ctx, device=dev)
    seq = torch.zeros(n, dtype=torch.long, device=dev)
    k = min(mla.topk, ctx)
    idx = torch.empty(n, k, dtype=torch.long, device=dev)
    valid = torch.empty(n, k, dtype=torch.bool, device=dev)
    rows = max(1, _LOGIT_BUDGET // ctx)
    for lo in range(0, n, rows):  # slabs of query rows: logits of a 128K chunk at once would not fit
        hi = min(n, lo + rows)
        t_hi = ctx - n + hi  # keys the slab's last query can see
        logits = paged_index_logits(iq[0, lo:hi], iw[0, lo:hi], cache.index_k(layer), cache.index_scale(layer),
                                    table[None], seq[lo:hi], q_pos[lo:hi], t_hi)
        part_idx, part_valid = select_from_logits(logits, q_pos[lo:hi], k)
        # A slab seeing fewer than k keys selects all it sees; pad with invalid entries.
        idx[lo:hi].zero_()
        valid[lo:hi].zero_()
        idx[lo:hi, : part_idx.shape[1]] = part_idx
        valid[lo:hi, : part_idx.shape[1]] = part_valid
    out = sparse_mla_prefill(mla.absorb(q_nope), q_pe, cache.latent(layer), table, idx, valid, mla.scale)
    return mla.unabsorb(out)
