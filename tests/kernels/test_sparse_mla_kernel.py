"""Sparse MLA over paged latents (Triton, interpreted) against the engine's gather-then-attend path."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.paged import block_tables, on
from workers.kernels.sparse_mla import (
    sparse_mla_decode, sparse_mla_decode_reference, sparse_mla_prefill, sparse_mla_prefill_reference,
)

BS, NB = 8, 32
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _selection(gen: torch.Generator, q_pos: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: k distinct positions in [0, span) with span ≥ k, valid where ≤ q_pos (at least one)."""
    span = max(k, int(q_pos.max()) + 1)
    idx = torch.stack([torch.randperm(span, generator=gen)[:k] for _ in range(q_pos.shape[0])])
    valid = idx <= q_pos[:, None]
    idx[:, 0] = torch.where(valid.any(1), idx[:, 0], q_pos)  # a row with nothing visible gets its own position
    return idx, idx <= q_pos[:, None]


def _inputs(seed: int, rows: int, heads: int, rank: int, rope: int, dtype: torch.dtype, lengths: list[int]):
    gen = torch.Generator().manual_seed(seed)
    table = block_tables(gen, lengths, BS, NB)
    latent = torch.randn(NB, BS, rank + rope, generator=gen).to(dtype)
    q_lat = torch.randn(rows, heads, rank, generator=gen).to(dtype)
    q_pe = torch.randn(rows, heads, rope, generator=gen).to(dtype)
    return gen, table, latent, q_lat, q_pe


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("splits", [1, 2])
def test_decode_matches_reference(dtype, splits, device):
    lengths = [40, 17, 64]
    gen, table, latent, q_lat, q_pe = _inputs(0, 3, 4, 32, 16, dtype, lengths)
    idx, valid = _selection(gen, torch.tensor(lengths) - 1, 48)  # > one 32-wide tile: two splits really split
    args = on(device, q_lat, q_pe, latent, table, idx, valid, 0.3)
    got = sparse_mla_decode(*args, num_splits=splits)
    assert got.shape == (3, 4, 32) and got.dtype == dtype
    torch.testing.assert_close(got, sparse_mla_decode_reference(*args), **TOL[dtype])


def test_decode_odd_widths_and_heads(device):
    """Heads, rank and rope widths that are not powers of two are masked, not read past."""
    lengths = [21, 33]
    gen, table, latent, q_lat, q_pe = _inputs(1, 2, 3, 48, 8, torch.float32, lengths)
    idx, valid = _selection(gen, torch.tensor(lengths) - 1, 40)
    args = on(device, q_lat, q_pe, latent, table, idx, valid, 0.25)
    got = sparse_mla_decode(*args, num_splits=2)
    torch.testing.assert_close(got, sparse_mla_decode_reference(*args), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_chunk_matches_reference(dtype, device):
    """Six queries at positions 64..69 of one sequence, each over its own 40 positions (some in its future)."""
    length, n = 70, 6
    gen, table, latent, q_lat, q_pe = _inputs(2, n, 4, 32, 16, dtype, [length])
    idx, valid = _selection(gen, torch.arange(length - n, length), 40)
    args = on(device, q_lat, q_pe, latent, table[0], idx, valid, 0.2)
    torch.testing.assert_close(sparse_mla_prefill(*args), sparse_mla_prefill_reference(*args), **TOL[dtype])


def test_split_without_valid_keys_has_no_weight(device):
    """A split whose positions are all invalid must not disturb the merge (nor produce NaN)."""
    gen, table, latent, q_lat, q_pe = _inputs(3, 1, 2, 16, 16, torch.float32, [64])
    idx = torch.randperm(64, generator=gen)[:64][None]
    valid = torch.zeros(1, 64, dtype=torch.bool)
    valid[0, :5] = True
    args = on(device, q_lat, q_pe, latent, table, idx, valid, 0.5)
    got = sparse_mla_decode(*args, num_splits=2)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, sparse_mla_decode_reference(*args), rtol=1e-4, atol=1e-4)
