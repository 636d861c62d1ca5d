"""DeepseekV32: the whole single-device model (embedding → blocks → norm → head, optional MTP).

Stable API: ``logits(input_ids[B, S]) -> float32 [B, S, vocab]`` (full causal forward, no cache) and
``forward(input_ids, positions, cache)`` for incremental decoding with any ``KVCache``.
"""

from __future__ import annotations

import torch
from torch import nn

from .block import Block, MTPLayer
from .cache import ContiguousKVCache, KVCache
from .config import ModelConfig
from .indexer import IndexerMode
from .mla import MLA, AttentionImpl
from .norm import RMSNorm
from .rope import YarnRotary
from .step import PagedLayers, StepBatch


class DeepseekV32(nn.Module):
    """DeepSeek-V3.2 (MLA + DSA + MoE). ``state_dict`` names are the internal names of names.py."""

    def __init__(self, config: ModelConfig, *, with_mtp: bool = False) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        n_mtp = config.num_nextn_predict_layers if with_mtp else 0
        self.mtp = nn.ModuleList(MTPLayer(config, j) for j in range(n_mtp))
        self.rotary = YarnRotary(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling)

    @property
    def num_cache_layers(self) -> int:
        """Cache layers this model writes: the decoder layers, then one per MTP layer."""
        return self.config.num_hidden_layers + len(self.mtp)

    def configure(self, *, indexer: IndexerMode | None = None, hadamard: bool = False, attention: AttentionImpl | None = None) -> "DeepseekV32":
        """Pick the indexer mode (``exact``/``fp8``, optional Hadamard) and the attention path
        (``sparse`` gather, or the ``dense`` mask reference) for every layer."""
        for module in self.modules():
            if isinstance(module, MLA):
                if indexer is not None:
                    module.indexer.set_mode(indexer, hadamard)
                if attention is not None:
                    if attention not in ("sparse", "dense"):
                        raise ValueError(f"attention must be 'sparse' or 'dense', got {attention!r}")
                    module.impl = attention
        return self

    @property
    def indexer_mode(self) -> IndexerMode:
        return self.layers[0].attn.indexer.mode

    def new_cache(self, batch_size: int, max_len: int) -> ContiguousKVCache:
        """A dense cache sized for this model (including MTP layers), on its device and dtype."""
        w = self.embed.weight
        return ContiguousKVCache(
            self.config, batch_size, max_len, num_layers=self.num_cache_layers, dtype=w.dtype,
            indexer_mode=self.indexer_mode, device=w.device,
        )

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids, positions: Long [B, S] → hidden states before the final norm, [B, S, hidden]."""
        x = self.embed(input_ids)
        rope = self.rotary.cos_sin(positions, x.dtype)
        for block in self.layers:
            x = block(x, positions, rope, cache)
        return x

    def hidden_step(self, input_ids: torch.Tensor, cache: PagedLayers, batch: StepBatch) -> torch.Tensor:
        """One engine step over a flat batch (``step.StepBatch``): input_ids Long [N] → hidden [N, dim]
        before the final norm. Projections and experts run once over all N tokens."""
        x = self.embed(input_ids)
        rope = self.rotary.cos_sin(batch.positions, x.dtype)
        for block in self.layers:
            x = block.forward_step(x, rope, cache, batch)
        return x

    def head_logits(self, hidden: torch.Tensor, *, float32: bool = True) -> torch.Tensor:
        """hidden: [..., dim] (before the final norm) → logits [..., vocab], float32 unless ``float32``
        is False (then the model's dtype: the sampler converts only the rows it needs)."""
        logits = self.head(self.norm(hidden))
        return logits.float() if float32 else logits

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Incremental forward: writes the tokens' latents into ``cache`` and attends over it.

        input_ids, positions: Long [B, S] → float32 logits [B, S, vocab].
        """
        return self.head_logits(self.hidden(input_ids, positions, cache))

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward without a cache. input_ids: Long [B, S] → float32 [B, S, vocab]."""
        b, s = input_ids.shape
        positions = torch.arange(s, device=input_ids.device).expand(b, s)
        return self.forward(input_ids, positions)

    def mtp_logits(
        self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Draft logits of the first MTP layer: hidden [B, S, dim] of tokens t, next_ids Long [B, S]
        (tokens t+1), positions Long [B, S] of t → float32 [B, S, vocab] for tokens t+2."""
        if not len(self.mtp):
            raise RuntimeError("this model was loaded without its MTP layer (load_model(..., load_mtp=True))")
        rope = self.rotary.cos_sin(positions, hidden.dtype)
        return self.mtp[0](hidden, next_ids, positions, rope, cache)[1]
