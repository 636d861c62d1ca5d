"""StepBatch: one engine step as a flat, variable-length batch over a paged KV cache.

The shape vLLM v1 and nano-vllm use: the tokens of every scheduled sequence are concatenated into one
row dimension N, so projections, MoE and the output head run once per step. Attention reads what each
sequence needs from the paged cache through its block table.

Row order: the ``num_decodes`` decode tokens first (one per sequence, sequences ``0 .. num_decodes-1``),
then each prefill sequence's chunk, contiguously. Sequence r's queries are rows
``query_start[r] .. query_start[r+1]-1`` at positions ``context_lens[r] - query_lens[r] ..
context_lens[r] - 1``; its cache holds positions ``0 .. context_lens[r] - 1`` once the step has written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class PagedLayers(Protocol):
    """Per-layer views of a paged KV cache (``kvstore.paged.PagedKVStorage`` implements it).

    Contract: each view is [num_blocks, block_size, X] over the same block ids; writes through the
    views land in the cache.
    """

    def latent(self, layer: int) -> torch.Tensor: ...  # [num_blocks, block_size, C]

    def index_k(self, layer: int) -> torch.Tensor: ...  # [num_blocks, block_size, D]

    def index_scale(self, layer: int) -> torch.Tensor: ...  # [num_blocks, block_size] float32


@dataclass(frozen=True)
class StepBatch:
    """Metadata of one flat step (see the module docstring for the row order).

    positions Long [N]; block_tables Long [R, W] (padded with block 0, never read past a context);
    slot_blocks / slot_offsets Long [N]: where each row's token is written; query_start: R + 1 row
    offsets; query_lens / context_lens: per sequence (Python ints: they steer Python-level slicing).

    ``lens`` Long [R] (optional) marks a *static-shape* decode step (a CUDA graph, ``workers.engine.graphs``):
    the context lengths are read from this tensor, ``context_lens`` are then only upper bounds, and the
    keys a sequence may see span the whole block-table width (W · block_size), masked by ``lens``.
    """

    positions: torch.Tensor
    block_tables: torch.Tensor
    slot_blocks: torch.Tensor
    slot_offsets: torch.Tensor
    query_start: tuple[int, ...]
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    num_decodes: int
    block_size: int
    lens: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.query_start[-1]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @staticmethod
    def build(
        block_tables: Sequence[Sequence[int]],
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        num_decodes: int,
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> "StepBatch":
        """From per-sequence block tables, query lengths and context lengths (after this step)."""
        if num_decodes and any(n != 1 for n in query_lens[:num_decodes]):
            raise ValueError("decode sequences run exactly one token each")
        width = max(1, max((len(t) for t in block_tables), default=1))
        table = torch.zeros(len(block_tables), width, dtype=torch.long)
        for row, blocks in enumerate(block_tables):
            table[row, : len(blocks)] = torch.as_tensor(list(blocks), dtype=torch.long)
        starts = [0]
        positions = []
        rows = []
        for r, (n, ctx) in enumerate(zip(query_lens, context_lens)):
            if not 0 < n <= ctx or -(-ctx // block_size) > len(block_tables[r]):
                raise ValueError(f"sequence {r}: {n} queries, {ctx} context, {len(block_tables[r])} blocks")
            starts.append(starts[-1] + n)
            positions.append(torch.arange(ctx - n, ctx))
            rows.append(torch.full((n,), r, dtype=torch.long))
        pos = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)
        row_of = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        blocks = table[row_of, pos // block_size]
        return StepBatch(
            positions=pos.to(device), block_tables=table.to(device), slot_blocks=blocks.to(device),
            slot_offsets=(pos % block_size).to(device), query_start=tuple(starts), query_lens=tuple(query_lens),
            context_lens=tuple(context_lens), num_decodes=num_decodes, block_size=block_size,
        )


def read_rows(view: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first ``length`` cached rows, contiguous: view [blocks, bs, X], table Long [W]
    → [length, X]. Reads whole blocks (one gather per block, not per row)."""
    bs = view.shape[1]
    nb = -(-length // bs)
    return view[table[:nb]].reshape(nb * bs, *view.shape[2:])[:length]


def read_batch_rows(view: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
    """Several sequences' first ``length`` rows: view [blocks, bs, X], tables Long [B, W] → [B, length', X]
    with length' = ceil(length / bs) · bs (rows past a sequence's context hold stale data: mask them)."""
    bs = view.shape[1]
    nb = -(-length // bs)
    return view[tables[:, :nb]].reshape(tables.shape[0], nb * bs, *view.shape[2:])
