"""Paged KV storage: one contiguous byte region per block, holding every layer's entries.

Block b's region is ``[layer 0: latent | index keys | key scales][layer 1: ...]...``, so one block is
one transfer descriptor. ``PagedKVView`` presents a batch of sequences' block tables to the model
as its ``KVCache``: writes scatter into slots, sparse attention gathers only selected slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workers.model.cache import EMPTY_POSITION
from workers.model.indexer import IndexKeys

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


class PagedKVView:
    """The model's ``KVCache`` over paged storage for a batch of sequences.

    block_tables: per sequence, its block ids in order; context_lens: per sequence, the tokens its
    cache holds once this forward has written (positions 0 .. len-1).
    """

    def __init__(self, storage: PagedKVStorage, block_tables: Sequence[Sequence[int]], context_lens: Sequence[int]) -> None:
        self.storage = storage
        self.bs = storage.layout.block_size
        device = storage.buffer.device
        width = max(1, max(len(t) for t in block_tables))
        self.table = torch.zeros(len(block_tables), width, dtype=torch.long, device=device)
        for row, blocks in enumerate(block_tables):
            self.table[row, : len(blocks)] = torch.as_tensor(list(blocks), dtype=torch.long)
        self.lens = torch.as_tensor(list(context_lens), dtype=torch.long, device=device)
        t = int(self.lens.max())
        pos = torch.arange(t, device=device).expand(len(block_tables), t)
        self.key_pos = pos.masked_fill(pos >= self.lens[:, None], EMPTY_POSITION)
        # Slot → (block, offset) for every position the batch's longest sequence holds.
        self._blocks = self.table.gather(1, (pos // self.bs).clamp(max=width - 1))
        self._offsets = pos % self.bs

    def _locate(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions Long [B, ...] → (block ids, offsets) of the same shape."""
        flat = positions.reshape(positions.shape[0], -1)
        blocks = self.table.gather(1, flat // self.bs).view_as(positions)
        return blocks, positions % self.bs

    def write(self, layer: int, positions: torch.Tensor, latent: torch.Tensor, keys: IndexKeys) -> None:
        blocks, offs = self._locate(positions)
        st = self.storage
        st.latent(layer)[blocks, offs] = latent.to(st.layout.latent_dtype)
        st.index_k(layer)[blocks, offs] = keys.values.to(st.layout.index_dtype)
        st.index_scale(layer)[blocks, offs] = keys.scale

    def index_keys(self, layer: int) -> tuple[IndexKeys, torch.Tensor]:
        st = self.storage
        keys = IndexKeys(st.index_k(layer)[self._blocks, self._offsets], st.index_scale(layer)[self._blocks, self._offsets])
        return keys, self.key_pos

    def gather_latents(self, layer: int, idx: torch.Tensor) -> torch.Tensor:
        blocks, offs = self._locate(idx)
        return self.storage.latent(layer)[blocks, offs]

    def latents(self, layer: int) -> torch.Tensor:
        return self.storage.latent(layer)[self._blocks, self._offsets]
