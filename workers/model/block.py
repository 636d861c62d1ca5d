"""The decoder block and the multi-token-prediction (MTP) layer."""

from __future__ import annotations

import torch
from torch import nn

from .cache import KVCache
from .config import ModelConfig
from .mla import MLA
from .moe import MLP, MoE
from .norm import RMSNorm
from .step import PagedLayers, StepBatch


class Block(nn.Module):
    """``x + MLA(norm(x))`` then ``x + FFN(norm(x))``; FFN is a dense MLP in the first
    ``first_k_dense_replace`` layers and an MoE after. x: [B, S, hidden] → [B, S, hidden]."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = MLA(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn: nn.Module = MoE(config) if config.is_moe_layer(layer) else MLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions, rope, cache, self.layer)
        return x + self.ffn(self.ffn_norm(x))

    def forward_step(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: PagedLayers, batch: StepBatch
    ) -> torch.Tensor:
        """One engine step over a flat batch: x [N, hidden] → [N, hidden]."""
        x = x + self.attn.forward_step(self.attn_norm(x), rope, cache, batch, self.layer)
        return x + self.ffn(self.ffn_norm(x))


class MTPLayer(nn.Module):
    """Predicts token t+2 from the main model's hidden state at t and the embedding of token t+1:
    ``h = eh_proj([enorm(embed(tok_{t+1})), hnorm(h_t)])`` → an MoE Block → head_norm → head.

    Carries its own copies of the embedding and output head, as DeepSeek's checkpoint stores them.
    Its Block uses cache layer ``num_hidden_layers + j``.
    """

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        dim = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, dim)
        self.enorm = RMSNorm(dim, config.rms_norm_eps)
        self.hnorm = RMSNorm(dim, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * dim, dim, bias=False)
        # MTP blocks are MoE blocks: their layer index is past first_k_dense_replace.
        self.block = Block(config, config.num_hidden_layers + index)
        self.head_norm = RMSNorm(dim, config.rms_norm_eps)
        self.head = nn.Linear(dim, config.vocab_size, bias=False)

    def forward(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: [B, S, dim] (main model, before its final norm); next_ids: Long [B, S] (tokens t+1);
        positions: Long [B, S] (of t) → (hidden [B, S, dim], logits float32 [B, S, vocab])."""
        h = self.eh_proj(torch.cat((self.enorm(self.embed(next_ids)), self.hnorm(hidden)), dim=-1))
        h = self.block(h, positions, rope, cache)
        return h, self.head(self.head_norm(h)).float()
