"""Small paged caches for kernel tests: random contents, shuffled block tables."""

from __future__ import annotations

import torch

from workers.model.indexer import ue8m0_quantize


def block_tables(gen: torch.Generator, lengths: list[int], block_size: int, num_blocks: int) -> torch.Tensor:
    """Long [R, W]: distinct random blocks per sequence (padded with block 0)."""
    need = [-(-n // block_size) for n in lengths]
    perm = torch.randperm(num_blocks, generator=gen)
    assert sum(need) <= num_blocks
    table = torch.zeros(len(lengths), max(need), dtype=torch.long)
    at = 0
    for r, n in enumerate(need):
        table[r, :n] = perm[at : at + n]
        at += n
    return table


def index_cache(gen: torch.Generator, num_blocks: int, block_size: int, dim: int, fp8: bool):
    """(index_k [NB, bs, D], index_scale float32 [NB, bs]) like the engine's cache holds."""
    k = torch.randn(num_blocks, block_size, dim, generator=gen)
    if fp8:
        return ue8m0_quantize(k)
    return k, torch.ones(num_blocks, block_size)


def fp8_round(q: torch.Tensor) -> torch.Tensor:
    """q as ``Indexer.queries`` returns it in fp8 mode: FP8-rounded with a per-head scale."""
    q8, s = ue8m0_quantize(q)
    return q8.float() * s.unsqueeze(-1)


def on(device: torch.device, *xs):
    """The tensors among xs moved to device (others as they are), as a tuple."""
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in xs)
