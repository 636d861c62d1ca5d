"""DecodeGraphs: pure-decode steps replayed from CUDA graphs, one graph per (batch, context) bucket.

A V3.2 decode step launches thousands of small kernels for a few dozen tokens; replaying a captured
graph removes the launch overhead, as vLLM and SGLang do for decode. A graph fixes every shape and
address, so a step is run padded to its bucket:

- batch: the next size of ``batch_buckets`` (1, 2, 4, … up to ``max_batch``). Padding rows repeat row 0
  (same token, position, block table and slot), so they compute what row 0 computes and write the same
  KV to the same slot; their logits are dropped.
- context: the block-table width is the next of ``context_buckets`` (in blocks, ×4 apart up to the longest
  context), so a short conversation does not scan 128K positions; the kernels read each sequence's length
  from a tensor (``StepBatch.lens``) and skip key tiles past its end.

All inputs live in static buffers that each step overwrites; buckets are captured on first use, after
an eager warm-up run (Triton compiles, FP8 projections settle their path). A step needs no host sync
inside the graph: the Triton attention path, the sync-free top-k and the fused MoE
(``workers.kernels.moe``) make it capturable; ``prepare_fused(model)`` readies a model or says why not.

``capture=False`` runs the same padded static-shape step eagerly on every call: how the padding and the
length masking are tested on the CPU. The engine uses graphs only on CUDA (``ModelRunner``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvstore.paged import PagedKVStorage
from workers import kernels
from workers.model.model import DeepseekV32
from workers.model.moe import MoE
from workers.model.step import StepBatch


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, … below ``max_batch``, then ``max_batch``."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


def context_buckets(max_blocks: int, first: int = 4) -> tuple[int, ...]:
    """Block-table widths ``first``, ×4 … below ``max_blocks``, then ``max_blocks``."""
    sizes, w = [], first
    while w < max_blocks:
        sizes.append(w)
        w *= 4
    return (*sizes, max_blocks)


def prepare_fused(model: DeepseekV32) -> str | None:
    """Ready ``model`` for capturable steps: stack every MoE layer's experts for the fused kernel
    (``workers.kernels.moe``; ``MoE.forward`` then uses it on CUDA). → None when every layer is ready,
    else why not: not CUDA tensors with Triton importable, or an MoE whose experts cannot be stacked (an
    expert-parallel rank exchanges tokens between processes and stays eager)."""
    if not kernels.available(model.embed.weight):
        return "needs CUDA tensors and triton"
    from workers.kernels.moe import stack_experts

    for module in model.modules():
        if isinstance(module, MoE) and module.stacked is None:
            module.stacked = stack_experts(module)
            if module.stacked is None:
                return "an MoE layer whose experts cannot be stacked (expert parallel)"
    return None


def _bucket(sizes: tuple[int, ...], n: int) -> int:
    return next(s for s in sizes if s >= n)


class DecodeGraphs:
    """Captured decode steps of one model over one paged KV storage.

    ``run(token_ids, block_tables, context_lens)`` → logits [B, vocab] (model dtype) of B ≤ ``max_batch``
    decode tokens whose contexts (including this token) fit ``max_blocks`` blocks. ``fits`` says whether
    a step qualifies.
    """

    def __init__(self, model: DeepseekV32, storage: PagedKVStorage, *, max_batch: int, max_blocks: int,
                 capture: bool | None = None) -> None:
        self.model, self.storage = model, storage
        self.block_size = storage.layout.block_size
        self.max_batch, self.max_blocks = max_batch, max_blocks
        self.batch_buckets = batch_buckets(max_batch)
        self.context_buckets = context_buckets(max_blocks)
        device = model.embed.weight.device
        self.capture = device.type == "cuda" if capture is None else capture
        long = dict(dtype=torch.long, device=device)
        self._ids = torch.zeros(max_batch, **long)
        self._positions = torch.zeros(max_batch, **long)
        self._lens = torch.ones(max_batch, **long)
        self._tables = torch.zeros(max_batch, max_blocks, **long)
        self._slot_blocks = torch.zeros(max_batch, **long)
        self._slot_offsets = torch.zeros(max_batch, **long)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None  # one memory pool for every graph: they never run at the same time
        self.steps = 0  # decode steps run through here (replayed, or eager when not capturing)

    @property
    def captured(self) -> list[tuple[int, int]]:
        """(batch, width) buckets captured so far."""
        return sorted(self._graphs)

    def fits(self, num_seqs: int, context_lens: Sequence[int]) -> bool:
        return 0 < num_seqs <= self.max_batch and max(context_lens) <= self.max_blocks * self.block_size

    def run(self, token_ids: Sequence[int], block_tables: Sequence[Sequence[int]],
            context_lens: Sequence[int]) -> torch.Tensor:
        """One decode token per sequence: token_ids [B], each sequence's block table and context length
        after this token → logits [B, vocab]."""
        n = len(token_ids)
        if not self.fits(n, context_lens):
            raise ValueError(f"{n} sequences, longest context {max(context_lens, default=0)}: past the captured "
                             f"limits ({self.max_batch} sequences, {self.max_blocks * self.block_size} tokens)")
        b = _bucket(self.batch_buckets, n)
        w = _bucket(self.context_buckets, -(-max(context_lens) // self.block_size))
        self._fill(token_ids, block_tables, context_lens, b, w)
        self.steps += 1
        if not self.capture:
            return self._forward(b, w)[:n]
        if (b, w) not in self._graphs:
            self._graphs[(b, w)] = self._capture(b, w)
        graph, out = self._graphs[(b, w)]
        graph.replay()
        return out[:n]

    def _fill(self, token_ids: Sequence[int], block_tables: Sequence[Sequence[int]], context_lens: Sequence[int],
              b: int, w: int) -> None:
        """Write the step into the static buffers, rows n..b-1 repeating row 0."""
        n, bs = len(token_ids), self.block_size
        rows = list(range(n)) + [0] * (b - n)
        table = torch.zeros(b, w, dtype=torch.long)
        for i, r in enumerate(rows):
            blocks = block_tables[r][: -(-context_lens[r] // bs)]
            table[i, : len(blocks)] = torch.as_tensor(list(blocks), dtype=torch.long)
        lens = torch.tensor([context_lens[r] for r in rows], dtype=torch.long)
        pos = lens - 1
        host = {
            "ids": torch.tensor([token_ids[r] for r in rows], dtype=torch.long), "lens": lens, "positions": pos,
            "slot_blocks": table[torch.arange(b), pos // bs], "slot_offsets": pos % bs,
        }
        for name, value in host.items():
            getattr(self, "_" + name)[:b].copy_(value, non_blocking=True)
        self._tables[:b, :w].copy_(table, non_blocking=True)

    def _forward(self, b: int, w: int) -> torch.Tensor:
        """The padded step over the static buffers' first b rows and w table columns → logits [b, vocab]."""
        batch = StepBatch(
            positions=self._positions[:b], block_tables=self._tables[:b, :w], slot_blocks=self._slot_blocks[:b],
            slot_offsets=self._slot_offsets[:b], query_start=tuple(range(b + 1)), query_lens=(1,) * b,
            context_lens=(w * self.block_size,) * b, num_decodes=b, block_size=self.block_size, lens=self._lens[:b],
        )
        hidden = self.model.hidden_step(self._ids[:b], self.storage, batch)
        return self.model.head_logits(hidden, float32=False)

    def _capture(self, b: int, w: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream (torch's documented recipe): kernels compile and lazy first-call
        # checks run outside the capture. It runs the real step: it writes the KV the replay writes again.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(b, w)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another engine thread of this process (local mode's prefill engine) may launch
        # work on the same GPU meanwhile; only this thread's calls are checked against the capture.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self._forward(b, w)
        self._pool = graph.pool()
        return graph, out
