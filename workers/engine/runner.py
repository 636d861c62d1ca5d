"""ModelRunner: turns one scheduled step into one model forward over the paged KV storage."""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq

import torch

from kvstore.paged import PagedKVStorage
from workers.model.model import DeepseekV32
from workers.model.step import StepBatch

from .graphs import DecodeGraphs, prepare_fused
from .sampler import sample
from .sequence import Sequence
from .types import TokenLogprob

log = logging.getLogger(__name__)


class ModelRunner:
    """Runs a step's decode tokens and prefill chunks as one flat batch (``StepBatch``).

    Only the rows that get sampled go through the output head: for a 129K vocabulary the head would
    otherwise dominate prefill.
    """

    def __init__(self, model: DeepseekV32, storage: PagedKVStorage, *, cuda_graph_max_batch: int = 0,
                 max_model_len: int | None = None) -> None:
        """``cuda_graph_max_batch``: pure-decode steps of up to this many sequences replay CUDA graphs
        (``graphs.DecodeGraphs``) where the model qualifies (CUDA; 0: always eager); contexts up to
        ``max_model_len`` (default: the model's)."""
        self.model = model
        self.storage = storage
        self.device = model.embed.weight.device
        # Resident weight bytes (parameters and buffers, whatever their dtype: FP8 weights count as FP8).
        self.weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        self.graphs: DecodeGraphs | None = None
        # Why decode steps run eagerly ("" when graphs are used); the fused MoE serves eager steps too.
        self.eager_reason = prepare_fused(model) or ""
        if cuda_graph_max_batch <= 0:
            self.eager_reason = "cuda graphs off (cuda_graph_max_batch = 0)"
        if not self.eager_reason:
            max_len = max_model_len or model.config.max_position_embeddings
            self.graphs = DecodeGraphs(model, storage, max_batch=cuda_graph_max_batch,
                                       max_blocks=-(-max_len // storage.layout.block_size))
        if self.device.type == "cuda":
            log.info("decode steps on %s: %s", self.device, self.eager_reason and f"eager ({self.eager_reason})"
                     or f"CUDA graphs up to {cuda_graph_max_batch} sequences")

    @torch.inference_mode()
    def run(self, work: Seq[tuple[Sequence, int]], num_decodes: int, sampled: Seq[bool]) -> torch.Tensor:
        """Run tokens ``[num_computed, num_computed + n)`` of each ``(sequence, n)``; the first
        ``num_decodes`` entries are decodes (n = 1). → logits [sum(sampled), vocab] (model dtype) of the last
        token of each entry whose ``sampled`` flag is set, in order."""
        ids: list[int] = []
        for seq, n in work:
            ids.extend(seq.token_ids[seq.num_computed_tokens : seq.num_computed_tokens + n])
        lens = [seq.num_computed_tokens + n for seq, n in work]
        tables = [seq.block_table for seq, _ in work]
        if self.graphs is not None and num_decodes == len(work) and self.graphs.fits(len(work), lens):
            try:
                logits = self.graphs.run(ids, tables, lens)
            except Exception as e:  # capture or replay: this GPU's or torch's failure, never the request's
                log.warning("CUDA graphs failed (%s: %s); decode steps run eagerly from now on", type(e).__name__, e)
                self.graphs, self.eager_reason = None, f"cuda graphs failed: {type(e).__name__}: {e}"
            else:
                return logits[torch.tensor([i for i, s in enumerate(sampled) if s], device=self.device)]
        batch = StepBatch.build(tables, [n for _, n in work], lens, num_decodes, self.storage.layout.block_size,
                                device=self.device)
        hidden = self.model.hidden_step(torch.tensor(ids, device=self.device), self.storage, batch)
        rows = [batch.query_start[i + 1] - 1 for i, s in enumerate(sampled) if s]
        if not rows:
            return hidden.new_empty(0, self.model.config.vocab_size)
        return self.model.head_logits(hidden[torch.tensor(rows, device=self.device)], float32=False)

    def run_and_sample(self, work: Seq[tuple[Sequence, int]],
                       num_decodes: int) -> tuple[list[bool], list[int], list[TokenLogprob | None]]:
        """``run`` then sample each entry whose last scheduled token is its last pending one → (sampled flag
        per entry, token and logprob entry per sampled entry, in order). Changes no sequence: the KV
        written past each ``num_computed_tokens`` counts only once the caller moves that count, so a
        failed attempt can simply run again (the seeded generators restored)."""
        sampled = [seq.num_pending == n for seq, n in work]
        logits = self.run(work, num_decodes, sampled)
        seqs = [seq for (seq, _), s in zip(work, sampled) if s]
        if not seqs:
            return sampled, [], []
        tokens, logprobs = sample(logits, [s.request.params for s in seqs], [s.generator for s in seqs])
        return sampled, tokens, logprobs
