"""The cache seen by the model: per layer, the MLA latent and the indexer keys of every token.

The model talks to any cache through ``KVCache``; ``ContiguousKVCache`` is the simple dense
implementation (tests, offline reference), ``LocalKV`` wraps the tokens of a cache-free forward, and
the engine's paged cache (``kvstore.paged``) implements the same protocol over 64-token blocks.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .config import ModelConfig
from .indexer import IndexerMode, IndexKeys

# Key position of a slot that holds nothing: above every query position, so never visible.
EMPTY_POSITION = torch.iinfo(torch.long).max


@runtime_checkable
class KVCache(Protocol):
    """Storage of MLA latents ([c_kv | roped k_pe], C = kv_lora_rank + qk_rope_head_dim values) and
    indexer keys (D values + a float32 scale) for a batch of B sequences, per layer.

    Contract:
    - ``write(layer, positions, latent, keys)`` stores token ``positions[b, s]`` of sequence b
      (positions: Long [B, S], latent: [B, S, C], keys: IndexKeys of [B, S, D]). The model writes a
      layer's new tokens before it reads that layer.
    - ``index_keys(layer)`` → ``(keys of [B, T, D], key_positions Long [B, T])``: every stored token
      of each sequence; slot t of sequence b holds position ``key_positions[b, t]`` (``EMPTY_POSITION``
      for a slot that holds nothing). A query at position p may attend to key positions ≤ p.
    - ``gather_latents(layer, idx)`` with idx Long [B, S, K] (slot indices into T, as returned by
      ``index_keys``) → latents [B, S, K, C]: only the selected ones are read.
    - ``latents(layer)`` → [B, T, C]: all of them (the dense reference path only).
    """

    def write(self, layer: int, positions: torch.Tensor, latent: torch.Tensor, keys: IndexKeys) -> None: ...

    def index_keys(self, layer: int) -> tuple[IndexKeys, torch.Tensor]: ...

    def gather_latents(self, layer: int, idx: torch.Tensor) -> torch.Tensor: ...

    def latents(self, layer: int) -> torch.Tensor: ...


def gather_rows(source: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """source [B, T, C], idx Long [B, S, K] → [B, S, K, C] (``source[b, idx[b, s, k]]``)."""
    rows = torch.arange(source.shape[0], device=source.device)[:, None, None]
    return source[rows, idx]


class LocalKV:
    """The S tokens of a forward without a cache, seen as a read-only KVCache of T = S slots."""

    def __init__(self, latent: torch.Tensor, keys: IndexKeys, positions: torch.Tensor) -> None:
        self._latent, self._keys, self._positions = latent, keys, positions

    def write(self, layer: int, positions: torch.Tensor, latent: torch.Tensor, keys: IndexKeys) -> None:
        raise RuntimeError("LocalKV is read-only")

    def index_keys(self, layer: int) -> tuple[IndexKeys, torch.Tensor]:
        return self._keys, self._positions

    def gather_latents(self, layer: int, idx: torch.Tensor) -> torch.Tensor:
        return gather_rows(self._latent, idx)

    def latents(self, layer: int) -> torch.Tensor:
        return self._latent


class ContiguousKVCache:
    """Dense per-sequence cache: latents [L, B, max_len, C], index keys [L, B, max_len, D] + scales.

    Slot t of a sequence holds its position t. ``num_layers`` counts the decoder layers plus any MTP
    layers that will use the cache.
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
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)  # slots written per sequence

    def write(self, layer: int, positions: torch.Tensor, latent: torch.Tensor, keys: IndexKeys) -> None:
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} exceeds the cache's max_len {self.max_len}")
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions)
        self.latent[layer, rows, positions] = latent.to(self.latent.dtype)
        self.index_k[layer, rows, positions] = keys.values.to(self.index_k.dtype)
        self.index_scale[layer, rows, positions] = keys.scale
        if layer == 0:
            self.length = torch.maximum(self.length, positions.max(dim=1).values + 1)

    def _t(self) -> int:
        return int(self.length.max())

    def index_keys(self, layer: int) -> tuple[IndexKeys, torch.Tensor]:
        t = self._t()
        pos = torch.arange(t, device=self.latent.device).expand(self.latent.shape[1], t)
        pos = pos.masked_fill(pos >= self.length[:, None], EMPTY_POSITION)
        return IndexKeys(self.index_k[layer, :, :t], self.index_scale[layer, :, :t]), pos

    def gather_latents(self, layer: int, idx: torch.Tensor) -> torch.Tensor:
        return gather_rows(self.latent[layer], idx)

    def latents(self, layer: int) -> torch.Tensor:
        return self.latent[layer, :, : self._t()]
