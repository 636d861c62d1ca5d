"""The flat-batch step path (``hidden_step`` over a paged cache) equals the reference forward.

Covers each attention regime: dense-when-short prefill (MHA form), sparse prefill (masked-dense slabs
and gathered slabs), chunks after a cached prefix, and batched decode rows mixed with prefill chunks.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvstore.paged import BlockLayout, PagedKVStorage
from workers.model.model import DeepseekV32
from workers.model.presets import load_preset
from workers.model.step import StepBatch
from workers.model.writer import random_state_dict

BS = 16


def _model(topk: int, seed: int = 0) -> DeepseekV32:
    cfg = dataclasses.replace(load_preset("tiny"), vocab_size=512, index_topk=topk)
    torch.manual_seed(seed)
    model = DeepseekV32(cfg)
    # std 0.1 instead of 0.02: index scores then differ, so top-k selection really chooses.
    weights = {k: v * 5 if v.dim() >= 2 else v for k, v in random_state_dict(cfg, seed=seed).items()}
    model.load_state_dict(weights, strict=False)
    return model.eval()


def _storage(model: DeepseekV32, num_blocks: int = 64) -> PagedKVStorage:
    mc = model.config
    layout = BlockLayout(mc.num_hidden_layers, BS, mc.latent_dim, torch.float32, mc.index_head_dim, torch.float32)
    return PagedKVStorage(layout, num_blocks)


class Seqs:
    """Sequences with disjoint block tables in one storage, stepped through ``hidden_step``."""

    def __init__(self, model: DeepseekV32, lengths: list[int]) -> None:
        self.model, self.storage = model, _storage(model)
        gen = torch.Generator().manual_seed(7)
        self.ids = [torch.randint(0, 512, (n,), generator=gen) for n in lengths]
        nxt = 0
        self.tables = []
        for n in lengths:
            nb = -(-n // BS)
            self.tables.append(list(range(nxt, nxt + nb)))
            nxt += nb
        self.done = [0] * len(lengths)

    @torch.inference_mode()
    def step(self, work: list[tuple[int, int]], num_decodes: int) -> list[torch.Tensor]:
        """work: (sequence, tokens) with decodes (1 token) first → hidden rows per entry."""
        ids, qlens, ctxs, tables = [], [], [], []
        for s, n in work:
            ids.append(self.ids[s][self.done[s] : self.done[s] + n])
            self.done[s] += n
            qlens.append(n)
            ctxs.append(self.done[s])
            tables.append(self.tables[s])
        batch = StepBatch.build(tables, qlens, ctxs, num_decodes, BS)
        hidden = self.model.hidden_step(torch.cat(ids), self.storage, batch)
        return [hidden[batch.query_start[i] : batch.query_start[i + 1]] for i in range(len(work))]

    @torch.inference_mode()
    def reference(self, s: int) -> torch.Tensor:
        ids = self.ids[s][None]
        return self.model.hidden(ids, torch.arange(ids.shape[1])[None])[0]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    assert float((a - b).abs().max() / b.abs().max()) < tol


@pytest.mark.parametrize("topk,length", [(64, 40), (32, 100), (16, 200)], ids=["dense", "masked-slabs", "gathered"])
def test_whole_prompt_prefill_equals_full_forward(topk, length):
    seqs = Seqs(_model(topk), [length])
    (got,) = seqs.step([(0, length)], 0)
    _close(got, seqs.reference(0))


@pytest.mark.parametrize("topk", [64, 16], ids=["dense", "sparse"])
def test_chunks_after_a_cached_prefix_equal_full_forward(topk):
    seqs = Seqs(_model(topk), [150])
    parts = [seqs.step([(0, n)], 0)[0] for n in (37, 50, 63)]
    _close(torch.cat(parts), seqs.reference(0))


@pytest.mark.parametrize("topk", [64, 8], ids=["dense-decode", "sparse-decode"])
def test_mixed_step_of_decodes_and_prefill_chunks(topk):
    """Three sequences decode (contexts below and above top-k) while two others prefill, in one forward."""
    lengths = [20, 45, 90, 70, 30]
    seqs = Seqs(_model(topk, seed=1), lengths)
    outs: dict[int, list[torch.Tensor]] = {i: [] for i in range(5)}
    for s, n in ((0, 18), (1, 43), (2, 88)):  # bring three sequences close to the end of their prompts
        outs[s] += seqs.step([(s, n)], 0)
    got = seqs.step([(0, 1), (1, 1), (2, 1), (3, 40), (4, 30)], 3)
    for s, h in zip((0, 1, 2, 3, 4), got):
        outs[s].append(h)
    got = seqs.step([(0, 1), (1, 1), (2, 1), (3, 30)], 3)
    for s, h in zip((0, 1, 2, 3), got):
        outs[s].append(h)
    for s in range(5):
        _close(torch.cat(outs[s]), seqs.reference(s))
