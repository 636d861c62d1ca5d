"""Paged KV storage: one contiguous byte region per block, holding every layer's entries.

Block b's region is ``[layer 0: latent | index keys | key scales][layer 1: ...]...``, so one block is
one transfer descriptor. The model reads and writes it through per-layer views
(``workers.model.step.PagedLayers``), with block tables from the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_ALIGN = 16


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class BlockLayout:
    """Byte layout of one block. Latents [block_size, latent_dim] in ``latent_dtype``; indexer keys
    [block_size, index_dim] in ``index_dtype``; key scales [block_size] float32."""

    num_layers: int
    block_size: int
    latent_dim: int
    latent_dtype: torch.dtype
    index_dim: int
    index_dtype: torch.dtype

    @property
    def latent_bytes(self) -> int:
        return _aligned(self.block_size * self.latent_dim * _itemsize(self.latent_dtype))

    @property
    def index_bytes(self) -> int:
        return _aligned(self.block_size * self.index_dim * _itemsize(self.index_dtype))

    @property
    def scale_bytes(self) -> int:
        return _aligned(self.block_size * 4)

    @property
    def layer_bytes(self) -> int:
        return self.latent_bytes + self.index_bytes + self.scale_bytes

    @property
    def bytes_per_block(self) -> int:
        return self.num_layers * self.layer_bytes

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_per_block / self.block_size


class PagedKVStorage:
    """``num_blocks`` blocks of ``layout`` in one uint8 buffer [num_blocks, bytes_per_block]."""

    def __init__(self, layout: BlockLayout, num_blocks: int, device: torch.device | str = "cpu") -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        self.buffer = torch.zeros(num_blocks, layout.bytes_per_block, dtype=torch.uint8, device=device)
        bs = layout.block_size
        self._latent, self._index_k, self._scale = [], [], []
        for layer in range(layout.num_layers):
            off = layer * layout.layer_bytes
            lat = self.buffer[:, off : off + bs * layout.latent_dim * _itemsize(layout.latent_dtype)]
            off += layout.latent_bytes
            idx = self.buffer[:, off : off + bs * layout.index_dim * _itemsize(layout.index_dtype)]
            off += layout.index_bytes
            scale = self.buffer[:, off : off + bs * 4]
            self._latent.append(lat.view(layout.latent_dtype).view(num_blocks, bs, layout.latent_dim))
            self._index_k.append(idx.view(layout.index_dtype).view(num_blocks, bs, layout.index_dim))
            self._scale.append(scale.view(torch.float32).view(num_blocks, bs))

    def latent(self, layer: int) -> torch.Tensor:
        """[num_blocks, block_size, latent_dim] view."""
        return self._latent[layer]

    def index_k(self, layer: int) -> torch.Tensor:
        """[num_blocks, block_size, index_dim] view."""
        return self._index_k[layer]

    def index_scale(self, layer: int) -> torch.Tensor:
        """[num_blocks, block_size] float32 view."""
        return self._scale[layer]

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """A copy of the blocks' bytes, [len(block_ids), bytes_per_block] uint8."""
        return self.buffer[torch.as_tensor(list(block_ids), dtype=torch.long)].clone()

    def write_blocks(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Overwrite the blocks with ``data`` [len(block_ids), bytes_per_block] uint8."""
        if data.shape != (len(block_ids), self.layout.bytes_per_block):
            raise ValueError(f"block data of shape {tuple(data.shape)} does not fit {len(block_ids)} blocks of this layout")
        self.buffer[torch.as_tensor(list(block_ids), dtype=torch.long)] = data.to(self.buffer.device)
