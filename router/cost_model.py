"""DSACostModel: seconds a prefill worker needs for a prompt, and bytes its KV takes (DeepSeek-V3.2 shape).

Pure arithmetic; ``router.policy`` weighs these seconds against queues and KV transfers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any


@dataclass(frozen=True)
class DSACostModel:
    """Seconds one prefill worker needs for ``new`` tokens after ``cached`` ones (DeepSeek-V3.2 shape).

    Shape defaults: the 671B release. Hardware defaults: one H800 node (8 GPUs) at DeepSeek's
    published prefill rate (≈32k computed tokens/s per node at ~4k context); see ``bench.routing``.
    """

    hidden_size: int = 7168
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    num_attention_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    linear_flops_per_s: float = 2.7e15  # effective GEMM + attention rate of the worker
    index_flops_per_s: float = 4.8e15  # effective FP8 indexer rate (twice the BF16 path)
    overhead_s: float = 0.005  # per request: scheduling, launch, first-token sampling

    @classmethod
    def from_model_config(cls, config: Any, **hardware: float) -> "DSACostModel":
        """From any config object with the HF field names (``workers.model.config.ModelConfig``)."""
        shape = {f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}
        return cls(**shape, **hardware)

    @cached_property
    def linear_flops_per_token(self) -> float:
        """2 × parameters touched per token: MLA and indexer projections, dense MLP or routed+shared experts."""
        d, h = self.hidden_size, self.num_attention_heads
        mla = (d * self.q_lora_rank + self.q_lora_rank * h * (self.qk_nope_head_dim + self.qk_rope_head_dim)
               + d * (self.kv_lora_rank + self.qk_rope_head_dim)
               + self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim) + h * self.v_head_dim * d)
        indexer = (self.q_lora_rank * self.index_n_heads * self.index_head_dim
                   + d * (self.index_head_dim + self.index_n_heads))
        dense = 3 * d * self.intermediate_size
        experts = self.num_experts_per_tok + self.n_shared_experts
        moe = 3 * d * self.moe_intermediate_size * experts + d * self.n_routed_experts
        n_moe = self.num_hidden_layers - self.first_k_dense_replace
        return 2.0 * (self.num_hidden_layers * (mla + indexer) + self.first_k_dense_replace * dense + n_moe * moe)

    def flops(self, new_tokens: int, cached_tokens: int = 0) -> tuple[float, float, float]:
        """(linear, sparse attention, indexer) FLOPs for positions ``cached .. cached+new-1``."""
        lo, hi, k = cached_tokens, cached_tokens + new_tokens, self.index_topk
        tri = lambda x: x * (x + 1) / 2  # noqa: E731 — Σ_{p<x} (p+1): causal positions seen
        capped = lambda x: tri(x) if x <= k else tri(k) + (x - k) * k  # noqa: E731 — Σ min(p+1, topk)
        h, layers = self.num_attention_heads, self.num_hidden_layers
        attention = 2.0 * h * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim) * layers
        indexer = 2.0 * self.index_n_heads * self.index_head_dim * layers
        return (new_tokens * self.linear_flops_per_token, attention * (capped(hi) - capped(lo)),
                indexer * (tri(hi) - tri(lo)))

    def prefill_s(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """Seconds to prefill; grows with ``new_tokens`` and, through the indexer, with ``cached_tokens``."""
        linear, attention, indexer = self.flops(new_tokens, cached_tokens)
        return self.overhead_s + (linear + attention) / self.linear_flops_per_s + indexer / self.index_flops_per_s

    @cached_property
    def seconds_per_token(self) -> float:
        """Linear-part seconds per token: turns a queue measured in tokens into seconds."""
        return self.linear_flops_per_token / self.linear_flops_per_s

    @cached_property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes of one token over all layers in the serving format: FP8 latent with four
        float32 tile scales and a bf16 RoPE part (656 B at V3.2's widths), plus the indexer's FP8 key
        and its float32 scale (132 B). 61 layers: 48 KB a token, 24.6 MB a 512-token block."""
        latent = self.kv_lora_rank + 4 * 4 + 2 * self.qk_rope_head_dim
        return self.num_hidden_layers * (latent + self.index_head_dim + 4)
