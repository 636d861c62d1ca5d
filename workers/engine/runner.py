"""ModelRunner: turns scheduled work into model forwards over the paged KV storage."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from kvstore.paged import PagedKVStorage, PagedKVView
from workers.model.model import DeepseekV32

from .sequence import Sequence


class ModelRunner:
    """Runs prefill chunks ([1, n] each) and decode batches ([B, 1]) and returns last-token logits.

    Only the positions that get sampled go through the output head: for a 129K vocabulary the head
    would otherwise dominate prefill.
    """

    def __init__(self, model: DeepseekV32, storage: PagedKVStorage) -> None:
        self.model = model
        self.storage = storage
        self.device = model.embed.weight.device

    @torch.inference_mode()
    def prefill(self, seq: Sequence, n: int) -> torch.Tensor:
        """Run tokens ``[num_computed, num_computed + n)`` of ``seq`` → logits float32 [vocab] of the last."""
        start = seq.num_computed_tokens
        ids = torch.tensor([seq.token_ids[start : start + n]], device=self.device)
        positions = torch.arange(start, start + n, device=self.device)[None]
        view = PagedKVView(self.storage, [seq.block_table], [start + n])
        hidden = self.model.hidden(ids, positions, view)
        return self.model.head_logits(hidden[:, -1:])[0, 0]

    @torch.inference_mode()
    def decode(self, seqs: Seq[Sequence]) -> torch.Tensor:
        """One new token per sequence (its last) → logits float32 [B, vocab]."""
        ids = torch.tensor([[s.token_ids[-1]] for s in seqs], device=self.device)
        positions = torch.tensor([[len(s.token_ids) - 1] for s in seqs], device=self.device)
        view = PagedKVView(self.storage, [s.block_table for s in seqs], [len(s.token_ids) for s in seqs])
        return self.model.forward(ids, positions, view)[:, 0]
