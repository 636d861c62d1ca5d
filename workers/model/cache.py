"""The cache seen by the model: per layer, the MLA latent and the indexer keys of every token.

The model talks to any cache through ``KVCache``; ``ContiguousKVCache`` is the simple dense
implementation (tests, offline generation). The engine's paged cache implements the same protocol.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .config import ModelConfig
from .indexer import IndexKeys, IndexerMode


@runtime_checkable
class KVCache(Protocol):
    """Storage of MLA latents ([c_kv | roped k_pe], C = kv_lora_rank + qk_rope_head_dim values) and
    indexer keys (D values + a float32 scale) for a batch of B sequences, per layer.

    Contract:
    - ``write(layer, positions, latent, keys)`` stores token ``positions[b, s]`` of sequence b
      (positions: Long [B, S], latent: [B, S, C], keys: IndexKeys of [B, S, D]). The model writes a
      layer's new tokens before it reads that layer.
    - ``read(layer)`` returns ``(latent [B, T, C], keys IndexKeys of [B, T, D], key_positions Long [B, T])``
      holding at least every written token. An entry is attended by a query at position p only when
      its key position is ≤ p, so slots never written must carry a position above every query of their
      sequence (a sequence's queries are never ahead of what it has written).
    """

    def write(self, layer: int, positions: torch.Tensor, latent: torch.Tensor, keys: IndexKeys) -> None: ...

    def read(self, layer: int) -> tuple[torch.Tensor, IndexKeys, torch.Tensor]: ...


class ContiguousKVCache:
    """Dense per-sequence cache: latents [L, B, max_len, C], index keys [L, B, max_len, D] + scales.

    ``num_layers`` counts the decoder layers plus any MTP layers that will use the cache.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        num_layers: int | None = None,
        dtype: torch.dtype = torch.float32,
        indexer_mode: IndexerMode = "exact",
        device: torch.device | str = "cpu",
    ) -> None:
        layers = config.num_hidden_layers if num_layers is None else num_layers
        key_dtype = torch.float8_e4m3fn if indexer_mode == "fp8" else torch.float32
        self.max_len = max_len
        self.latent = torch.zeros(layers, batch_size, max_len, config.latent_dim, dtype=dtype, device=device)
        self.index_k = torch.zeros(layers, batch_size, max_len, config.index_head_dim, dtype=key_dtype, device=device)
        self.index_scale = torch.ones(layers, batch_size, max_len, dtype=torch.float32, device=device)
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens written per sequence

    def write(self, layer: int, positions: torch.Tensor, latent: torch.Tensor, keys: IndexKeys) -> None:
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} exceeds the cache's max_len {self.max_len}")
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions)
        self.latent[layer, rows, positions] = latent.to(self.latent.dtype)
        self.index_k[layer, rows, positions] = keys.values.to(self.index_k.dtype)
        self.index_scale[layer, rows, positions] = keys.scale
        if layer == 0:
            self.length = torch.maximum(self.length, positions.max(dim=1).values + 1)

    def read(self, layer: int) -> tuple[torch.Tensor, IndexKeys, torch.Tensor]:
        t = int(self.length.max())
        b = self.latent.shape[1]
        key_pos = torch.arange(t, device=self.latent.device).expand(b, t)
        keys = IndexKeys(self.index_k[layer, :, :t], self.index_scale[layer, :, :t])
        return self.latent[layer, :, :t], keys, key_pos
