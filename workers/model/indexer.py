"""The lightning indexer of DeepSeek Sparse Attention, and top-k selection.

Per query token t and earlier token s the indexer scores
``I[t, s] = Σ_h w[t, h] · ReLU(q[t, h] · k[s]) / √D`` with a few small heads (64 × 128 in V3.2) and one
shared key per token; the top-k positions by ``I`` are the only ones MLA attends to.

Two modes: ``exact`` (float32, what transformers computes; the reference) and ``fp8`` (DeepSeek's
e4m3 quantization with ue8m0 power-of-two scales, one per head for q and one per token for k,
optionally after an orthonormal Hadamard rotation that spreads outliers before rounding).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .rope import apply_neox

IndexerMode = Literal["exact", "fp8"]
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_SCORE_BUDGET = 1 << 23  # float32 scores of one query slab [B, s', T] (32 MiB)
_SLAB_ROWS = 512  # query rows per slab at most: keeps key tiles (below) wide enough for efficient GEMMs
_TILE_BUDGET = 1 << 20  # float32 per-head logits of one key tile [B, s'·H, tile] (4 MiB: stays in cache)


class IndexKeys(NamedTuple):
    """Indexer keys of T tokens: ``values`` [..., T, D] (float, or float8_e4m3fn in fp8 mode) and
    ``scale`` float32 [..., T] (ones in exact mode). The dequantized key is ``values · scale``."""

    values: torch.Tensor
    scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.values.float() * self.scale.unsqueeze(-1)


def ue8m0_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the last dim of x as one e4m3 block with a power-of-two scale.

    x: [..., D] → (x8 float8_e4m3fn [..., D], scale float32 [...]) with ``x ≈ x8 · scale``.
    """
    amax = x.float().abs().amax(dim=-1).clamp(min=1e-4)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    x8 = (x.float() / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return x8, scale


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh–Hadamard transform of the last dim (a power of two). x: [..., D] → [..., D]."""
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two index_head_dim, got {d}")
    h = torch.ones(1, 1, dtype=torch.float32, device=x.device)
    while h.shape[0] < d:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (x.float() @ h * d**-0.5).to(x.dtype)


class Indexer(nn.Module):
    """Lightning indexer: scores every earlier token for each query token.

    Weights: wq_b [Hi·D, q_lora_rank] (input: MLA's normalized q latent), wk [D, hidden],
    k_norm LayerNorm [D] (float32), weights_proj [Hi, hidden] (float32 compute).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.topk = config.index_topk
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)
        self.mode: IndexerMode = "exact"
        self.use_hadamard = False

    def set_mode(self, mode: IndexerMode, hadamard: bool = False) -> None:
        if mode not in ("exact", "fp8"):
            raise ValueError(f"indexer mode must be 'exact' or 'fp8', got {mode!r}")
        self.mode, self.use_hadamard = mode, hadamard

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Rope part first, then the rest (V3.2's fixed layout): [pe | nope].
        pe, nope = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((apply_neox(pe, cos, sin), nope), dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> IndexKeys:
        """x: [B, S, hidden]; cos/sin: [B, S, rope/2] → IndexKeys of [B, S, D] (what the cache stores)."""
        k = self.wk(x)
        k = F.layer_norm(k.float(), (self.head_dim,), self.k_norm.weight.float(), self.k_norm.bias.float(), 1e-6)
        k = self._rope(k, cos, sin)
        if self.use_hadamard:
            k = hadamard(k)
        if self.mode == "fp8":
            return IndexKeys(*ue8m0_quantize(k))
        return IndexKeys(k, torch.ones(k.shape[:-1], dtype=torch.float32, device=k.device))

    def queries(
        self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, S, hidden], qr: [B, S, q_lora_rank] → (q float32 [B, S, Hi, D], w float32 [B, S, Hi]).

        ``w`` already holds ``Hi^-0.5 · D^-0.5`` (and q's FP8 scale is applied to q).
        """
        b, s, _ = x.shape
        q = self.wq_b(qr).view(b, s, self.n_heads, self.head_dim).float()
        q = self._rope(q, cos, sin)
        if self.use_hadamard:
            q = hadamard(q)
        if self.mode == "fp8":
            q8, q_scale = ue8m0_quantize(q)
            q = q8.float() * q_scale.unsqueeze(-1)
        w = F.linear(x.float(), self.weights_proj.weight.float())
        return q, w * (self.n_heads**-0.5 * self.head_dim**-0.5)

    @staticmethod
    def scores(q: torch.Tensor, w: torch.Tensor, keys: IndexKeys) -> torch.Tensor:
        """Index scores (reference). q: [B, S, Hi, D], w: [B, S, Hi], keys of [B, T, D] → float32 [B, S, T]."""
        logits = torch.einsum("bshd,btd->bsht", q, keys.dequantize()).relu_()
        return torch.einsum("bsht,bsh->bst", logits, w)

    @staticmethod
    def select(
        q: torch.Tensor, w: torch.Tensor, keys: IndexKeys, q_pos: torch.Tensor, k_pos: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score and select top-k slab by slab: never holds more than one slab of query rows'
        scores, so a 128K-token chunked prefill stays in O(slab · T) memory.

        Same arguments and result as ``select_topk(Indexer.scores(q, w, keys), q_pos, k_pos, k)``
        (the reference), given key positions that do not decrease along T (true of every cache
        here): a slab then scores only the keys up to its last query's position, and masks only the
        keys past its first query's position.
        """
        kd_t = keys.dequantize().transpose(1, 2)  # [B, D, T]
        b, s, h, d = q.shape
        t = kd_t.shape[-1]
        kk = min(k, t)
        rows = max(1, min(s, _SLAB_ROWS, _SCORE_BUDGET // max(1, b * t)))
        idx = torch.zeros(b, s, kk, dtype=torch.long, device=q.device)
        valid = torch.zeros(b, s, kk, dtype=torch.bool, device=q.device)
        # One score buffer for every slab: a fresh tensor this large is page-faulted in each time.
        buffer = torch.empty(b * min(rows, s) * t, dtype=torch.float32, device=q.device)
        for lo in range(0, s, rows):
            hi = min(s, lo + rows)
            qp = q_pos[:, lo:hi]
            # Causality: keys past the slab's last query position are invisible to all of it.
            t_hi = max(1, int((k_pos <= qp.max()).sum(dim=1).max()))
            # A contiguous view of the buffer's start: top-k over strided rows was ~3× slower.
            slab = _scores(q[:, lo:hi], w[:, lo:hi], kd_t[..., :t_hi], buffer[: b * (hi - lo) * t_hi].view(b, hi - lo, t_hi))
            # Keys at or before the slab's first query are visible to every query in it: mask the rest.
            t_lo = min(t_hi, int((k_pos <= qp.min()).sum(dim=1).min()))
            slab[..., t_lo:].masked_fill_(k_pos[:, None, t_lo:t_hi] > qp[:, :, None], -math.inf)
            part_idx = _topk_earliest_on_ties(slab, k)
            idx[:, lo:hi, : part_idx.shape[-1]] = part_idx
            valid[:, lo:hi, : part_idx.shape[-1]] = _visible(part_idx, qp, k_pos)
        return idx, valid


def _scores(q: torch.Tensor, w: torch.Tensor, kd_t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Index scores of a slab, key tile by key tile so the per-head logits stay cache-sized (never
    [S, H, T]). q [B, s, H, D], w [B, s, H], kd_t [B, D, T] → ``out`` float32 [B, s, T], filled."""
    b, s, h, d = q.shape
    t = kd_t.shape[-1]
    qf = q.reshape(b, s * h, d)  # heads folded into the rows: one GEMM per tile
    wf = w.unsqueeze(2)  # [B, s, 1, H]
    tile = max(64, _TILE_BUDGET // max(1, b * s * h))
    for k0 in range(0, t, tile):
        k1 = min(t, k0 + tile)
        logits = torch.matmul(qf, kd_t[..., k0:k1]).view(b, s, h, k1 - k0).relu_()
        out[..., k0:k1] = torch.matmul(wf, logits).squeeze(2)  # head-weighted sum: batched GEMV
    return out


def _visible(idx: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """idx Long [B, S, K] into k_pos [B, T]; q_pos [B, S] → bool [B, S, K]: key visible to its query."""
    b, s, kk = idx.shape
    return k_pos.gather(1, idx.reshape(b, s * kk)).view(b, s, kk) <= q_pos[..., None]


def _topk_earliest_on_ties(masked: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k indices of masked scores [B, S, T] (invisible keys at -inf) → Long [B, S, min(k, T)].

    Ties at the k-th score (common: every head's ReLU at zero) are broken by the earlier position,
    so the selection does not depend on how many keys a call sees (full forward vs. decode step).
    A tie crosses the boundary exactly when the (k+1)-th score equals the k-th; only those rows pay
    for the fix: every score above the k-th, then the earliest of those equal to it.
    """
    t = masked.shape[-1]
    kk = min(k, t)
    if kk == t:
        return masked.topk(kk, dim=-1, sorted=False).indices
    # Unsorted top-(k+1) (the sorted variant costs ~1.6× as much): its minimum is the (k+1)-th score,
    # and the k-th equals it exactly when the minimum occurs twice.
    values, idx = masked.topk(kk + 1, dim=-1, sorted=False)
    low, at = values.min(dim=-1, keepdim=True)
    tied = torch.isfinite(low[..., 0]) & ((values == low).sum(dim=-1) >= 2)
    keep = torch.ones_like(idx, dtype=torch.bool).scatter_(-1, at, False)
    idx = idx[keep].view(*idx.shape[:-1], kk)  # drop the (k+1)-th
    if tied.any():
        rows, th = masked[tied], low[tied]  # [R, T]; in a tied row the k-th score equals the (k+1)-th
        above = rows > th
        equal = rows == th
        need = kk - above.sum(dim=-1, keepdim=True)
        chosen = above | (equal & (equal.cumsum(dim=-1) <= need))  # exactly kk per row
        idx[tied] = chosen.nonzero()[:, 1].view(-1, kk)
    return idx


def select_topk(
    scores: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k causal selection.

    scores: [B, S, T]; q_pos: Long [B, S]; k_pos: Long [B, T] (key j is visible to query i iff
    k_pos[j] ≤ q_pos[i]) → (idx Long [B, S, K] into T, valid bool [B, S, K]) with K = min(k, T).
    When fewer than K keys are visible every visible key is selected and the rest are invalid.
    """
    visible = k_pos[:, None, :] <= q_pos[:, :, None]
    masked = scores.masked_fill(~visible, -math.inf)
    idx = _topk_earliest_on_ties(masked, k)
    return idx, visible.gather(-1, idx)
