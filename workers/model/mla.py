"""Multi-head Latent Attention with DeepSeek Sparse Attention.

Per token MLA caches one latent of C = kv_lora_rank + qk_rope_head_dim values ([c_kv | roped k_pe]).
Queries attend only to the top-k positions chosen by the lightning indexer.

Two ways to attend, giving the same result:
- ``dense`` (reference, "MHA mode"): expand every cached latent to per-head keys and values with
  wkv_b and apply the top-k set as an additive mask over all T positions — O(S·T) memory.
- ``sparse`` (default, absorbed "MQA mode"): fold W_UK into the query and W_UV after the attention,
  gather only the K selected latents per query — O(S·K) memory.

Shape legend: B batch, S query tokens, T cached tokens, K selected, H heads, r kv_lora_rank,
p qk_rope_head_dim, n qk_nope_head_dim, v v_head_dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from .cache import KVCache, LocalKV
from .config import ModelConfig
from .fp8 import dense_weight
from .indexer import Indexer, IndexKeys
from .norm import RMSNorm
from .rope import apply_interleaved
from .step import PagedLayers, StepBatch
from .step_attention import attend_step, write_step

AttentionImpl = Literal["sparse", "dense"]
_GATHER_BUDGET = 1 << 25  # float elements of one gathered [B, chunk, K, C] latent slab


class MLA(nn.Module):
    """MLA + DSA for one layer. Weights as in DeepSeek's checkpoint (see names.py)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.rank = config.kv_lora_rank
        self.nope = config.qk_nope_head_dim
        self.rope = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.topk = config.index_topk
        self.scale = config.softmax_scale
        self.wq_a = nn.Linear(config.hidden_size, config.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * config.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(config.hidden_size, self.rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(self.rank, config.rms_norm_eps)
        self.wkv_b = nn.Linear(self.rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_dim, config.hidden_size, bias=False)
        self.indexer = Indexer(config)
        self.impl: AttentionImpl = "sparse"

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x: [B, S, hidden], positions: Long [B, S], rope: (cos, sin) [B, S, p/2] → [B, S, hidden].

        Without a cache the S tokens attend among themselves (a full causal forward).
        """
        b, s, _ = x.shape
        cos, sin = rope
        qr, q_nope, q_pe, latent, keys = self.project(x, cos, sin)

        if cache is None:
            cache = LocalKV(latent, keys, positions)
        else:
            cache.write(layer, positions, latent, keys)
        keys, key_pos = cache.index_keys(layer)

        t = key_pos.shape[1]
        if t <= self.topk:
            # Every visible position is selected: DSA is dense causal MLA here, no scoring needed.
            idx = torch.arange(t, device=x.device).expand(b, s, t)
            valid = key_pos[:, None, :] <= positions[:, :, None]
        else:
            iq, iw = self.indexer.queries(x, qr, cos, sin)
            idx, valid = Indexer.select(iq, iw, keys, positions, key_pos, self.topk)

        if self.impl == "dense":
            out = self.attend_dense(q_nope, q_pe, cache.latents(layer), idx, valid)
        else:
            out = self.attend_sparse(q_nope, q_pe, lambda sel: cache.gather_latents(layer, sel), idx, valid)
        return self.wo(out.flatten(2))

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The per-token projections. x: [B, S, hidden], cos/sin [B, S, p/2] → (qr [B, S, q_lora_rank],
        q_nope [B, S, H, n], roped q_pe [B, S, H, p], latent [B, S, C], indexer keys of [B, S, D])."""
        b, s, _ = x.shape
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).view(b, s, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_interleaved(q_pe, cos, sin)
        c_kv, k_pe = self.wkv_a(x).split([self.rank, self.rope], dim=-1)
        latent = torch.cat((self.kv_norm(c_kv), apply_interleaved(k_pe, cos, sin)), dim=-1)
        return qr, q_nope, q_pe, latent, self.indexer.keys(x, cos, sin)

    def forward_step(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: PagedLayers, batch: StepBatch, layer: int
    ) -> torch.Tensor:
        """One engine step over a flat batch (see ``step.StepBatch``): x [N, hidden], rope (cos, sin)
        [N, p/2] → [N, hidden]. Writes the N tokens into the paged ``cache`` first."""
        cos, sin = rope[0][None], rope[1][None]
        qr, q_nope, q_pe, latent, keys = self.project(x[None], cos, sin)
        latent = latent[0]
        write_step(cache, layer, batch, latent, IndexKeys(keys.values[0], keys.scale[0]))
        out = attend_step(self, cache, layer, batch, q_nope[0], q_pe[0], latent, (x, qr[0], rope[0], rope[1]))
        return self.wo(out.flatten(1))

    def absorb(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [..., H, n] → the query in latent space [..., H, r] (W_UK folded into the query)."""
        return torch.einsum("...hn,hnr->...hr", q_nope, self._wkv_b(q_nope.dtype)[0])

    def unabsorb(self, o: torch.Tensor) -> torch.Tensor:
        """Attention output in latent space [..., H, r] → [..., H, v] (W_UV applied after attention)."""
        return torch.einsum("...hr,hvr->...hv", o, self._wkv_b(o.dtype)[1])

    def _wkv_b(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, n, r] and W_UV [H, v, r] views of wkv_b (an FP8 wkv_b is dequantized into ``dtype``)."""
        w = dense_weight(self.wkv_b, dtype).view(self.n_heads, self.nope + self.v_dim, self.rank)
        return w[:, : self.nope], w[:, self.nope :]

    def attend_dense(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Reference: per-head K/V for all T positions, top-k applied as a mask.

        q_nope [B, S, H, n], q_pe [B, S, H, p], latent [B, T, C], idx/valid [B, S, K] → [B, S, H, v].
        """
        b, s, _, _ = q_nope.shape
        t = latent.shape[1]
        c_kv, k_pe = latent.split([self.rank, self.rope], dim=-1)
        kv = self.wkv_b(c_kv).view(b, t, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        scores = torch.einsum("bshd,bthd->bhst", q_nope, k_nope) + torch.einsum("bshd,btd->bhst", q_pe, k_pe)
        allowed = torch.zeros(b, s, t, dtype=torch.bool, device=latent.device)
        allowed.scatter_(-1, idx, valid)
        scores = scores.float().mul(self.scale).masked_fill(~allowed[:, None], -math.inf)
        probs = scores.softmax(dim=-1).to(v.dtype)
        return torch.einsum("bhst,bthd->bshd", probs, v)

    def attend_sparse(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        gather: Callable[[torch.Tensor], torch.Tensor],
        idx: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """Absorbed attention over the K gathered latents of each query.

        q_nope [B, S, H, n], q_pe [B, S, H, p], idx/valid [B, S, K]; ``gather(idx[:, s0:s1])`` returns
        the selected latents [B, s1-s0, K, C] (from a paged cache: only those blocks' rows are read)
        → [B, S, H, v].
        """
        q_lat = self.absorb(q_nope)
        b, s, k = idx.shape
        out = q_nope.new_empty(b, s, self.n_heads, self.rank)
        step = max(1, _GATHER_BUDGET // max(1, b * k * (self.rank + self.rope)))
        for lo in range(0, s, step):
            hi = min(s, lo + step)
            sel = gather(idx[:, lo:hi])  # [B, s', K, C]: only the selected latents
            c_kv, k_pe = sel.split([self.rank, self.rope], dim=-1)
            scores = torch.einsum("bshr,bskr->bshk", q_lat[:, lo:hi], c_kv)
            scores = scores + torch.einsum("bshp,bskp->bshk", q_pe[:, lo:hi], k_pe)
            scores = scores.float().mul(self.scale).masked_fill(~valid[:, lo:hi, None, :], -math.inf)
            probs = scores.softmax(dim=-1).to(c_kv.dtype)
            out[:, lo:hi] = torch.einsum("bshk,bskr->bshr", probs, c_kv)
        return self.unabsorb(out)
