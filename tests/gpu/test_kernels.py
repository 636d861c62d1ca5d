"""The Triton DSA kernels against their PyTorch references at DeepSeek-V3.2's real widths (CUDA only):
64 index heads × 128, top-k 2048, latent 512 + 64 rope, 128 heads, FP8 index keys, bf16 latents."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]

HI, D, TOPK, RANK, ROPE, H, BS = 64, 128, 2048, 512, 64, 128, 64
SCALE = 192**-0.5 * 1.873854  # V3.2: qk_head_dim^-0.5 · YaRN mscale²


def _table(gen: torch.Generator, lengths: list[int], num_blocks: int) -> torch.Tensor:
    need = [-(-n // BS) for n in lengths]
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(lengths), max(need), dtype=torch.long)
    at = 0
    for r, n in enumerate(need):
        table[r, :n] = perm[at : at + n]
        at += n
    return table.cuda()


def _index_inputs(gen: torch.Generator, rows: int, num_blocks: int):
    from workers.model.indexer import ue8m0_quantize

    k8, ks = ue8m0_quantize(torch.randn(num_blocks, BS, D, generator=gen).cuda())
    q8, qs = ue8m0_quantize(torch.randn(rows, HI, D, generator=gen).cuda())
    w = torch.randn(rows, HI, generator=gen).cuda() * (HI**-0.5 * D**-0.5)
    return q8.float() * qs[..., None], w, k8, ks


def _overlap(idx, valid, ridx, rvalid) -> float:
    got = [set(i[v].tolist()) for i, v in zip(idx.cpu(), valid.cpu())]
    want = [set(i[v].tolist()) for i, v in zip(ridx.cpu(), rvalid.cpu())]
    return min(len(a & b) / max(1, len(b)) for a, b in zip(got, want))


def _check_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-3, atol=1e-3)


def test_indexer_decode_at_v32_widths():
    from workers.kernels.indexer import (
        paged_index_logits, paged_index_logits_reference, paged_index_topk, paged_index_topk_reference,
    )

    gen = torch.Generator().manual_seed(0)
    lengths = [8192, 3000, 12345, 2049]
    nb = sum(-(-n // BS) for n in lengths) + 8
    table = _table(gen, lengths, nb)
    q, w, k8, ks = _index_inputs(gen, len(lengths), nb)
    q_pos = torch.tensor(lengths, device="cuda") - 1
    args = (q, w, k8, ks, table, torch.arange(len(lengths), device="cuda"), q_pos, max(lengths))
    _check_logits(paged_index_logits(*args), paged_index_logits_reference(*args))
    assert _overlap(*paged_index_topk(*args, TOPK), *paged_index_topk_reference(*args, TOPK)) > 0.99


def test_indexer_prefill_chunk_at_v32_widths():
    from workers.kernels.indexer import paged_index_logits, paged_index_logits_reference

    gen = torch.Generator().manual_seed(1)
    ctx, n = 6000, 256
    table = _table(gen, [ctx], -(-ctx // BS) + 4)
    q, w, k8, ks = _index_inputs(gen, n, table.shape[1] + 4)
    q_pos = torch.arange(ctx - n, ctx, device="cuda")
    args = (q, w, k8, ks, table, torch.zeros(n, dtype=torch.long, device="cuda"), q_pos, ctx)
    _check_logits(paged_index_logits(*args), paged_index_logits_reference(*args))


def _mla_inputs(gen: torch.Generator, rows: int, lengths: list[int], q_pos: torch.Tensor):
    nb = sum(-(-n // BS) for n in lengths) + 8
    table = _table(gen, lengths, nb)
    latent = torch.randn(nb, BS, RANK + ROPE, generator=gen).cuda().bfloat16()
    q_lat = torch.randn(rows, H, RANK, generator=gen).cuda().bfloat16()
    q_pe = torch.randn(rows, H, ROPE, generator=gen).cuda().bfloat16()
    span = max(TOPK, int(q_pos.max()) + 1)
    idx = torch.stack([torch.randperm(span, generator=gen)[:TOPK] for _ in range(rows)]).cuda()
    return table, latent, q_lat, q_pe, idx, idx <= q_pos.cuda()[:, None]


@pytest.mark.parametrize("batch", [1, 8])
def test_sparse_mla_decode_at_v32_widths(batch):
    from workers.kernels.sparse_mla import sparse_mla_decode, sparse_mla_decode_reference

    gen = torch.Generator().manual_seed(2)
    lengths = [8192 + 1000 * i for i in range(batch)]
    table, latent, q_lat, q_pe, idx, valid = _mla_inputs(gen, batch, lengths, torch.tensor(lengths) - 1)
    args = (q_lat, q_pe, latent, table, idx, valid, SCALE)
    torch.testing.assert_close(sparse_mla_decode(*args), sparse_mla_decode_reference(*args), rtol=2e-2, atol=2e-2)


def test_sparse_mla_prefill_at_v32_widths():
    from workers.kernels.sparse_mla import sparse_mla_prefill, sparse_mla_prefill_reference

    gen = torch.Generator().manual_seed(3)
    ctx, n = 4096, 64
    table, latent, q_lat, q_pe, idx, valid = _mla_inputs(gen, n, [ctx], torch.arange(ctx - n, ctx))
    args = (q_lat, q_pe, latent, table[0], idx, valid, SCALE)
    torch.testing.assert_close(sparse_mla_prefill(*args), sparse_mla_prefill_reference(*args), rtol=2e-2, atol=2e-2)


def _steps(model, device: str, lengths: list[int], chunks: list[list[tuple[int, int]]], decodes: list[int]):
    """Run ``chunks`` (per step: (sequence, tokens), decodes first) through ``hidden_step`` on ``device``
    with a paged cache there → the hidden rows of every sequence, in order, on the CPU."""
    from kvstore.paged import BlockLayout, PagedKVStorage
    from workers.model.step import StepBatch

    mc = model.config
    layout = BlockLayout(mc.num_hidden_layers, 16, mc.latent_dim, torch.float32, mc.index_head_dim, torch.float32)
    storage = PagedKVStorage(layout, 64, device=device)
    gen = torch.Generator().manual_seed(7)
    ids = [torch.randint(0, 512, (n,), generator=gen) for n in lengths]
    tables, nxt = [], 0
    for n in lengths:
        tables.append(list(range(nxt, nxt + -(-n // 16))))
        nxt += len(tables[-1])
    done = [0] * len(lengths)
    outs: list[list[torch.Tensor]] = [[] for _ in lengths]
    with torch.inference_mode():
        for work, nd in zip(chunks, decodes):
            step_ids = []
            for s, n in work:
                step_ids.append(ids[s][done[s] : done[s] + n])
                done[s] += n
            batch = StepBatch.build([tables[s] for s, _ in work], [n for _, n in work], [done[s] for s, _ in work],
                                    nd, 16, device=device)
            hidden = model.hidden_step(torch.cat(step_ids).to(device), storage, batch).cpu()
            for i, (s, _) in enumerate(work):
                outs[s].append(hidden[batch.query_start[i] : batch.query_start[i + 1]])
    return [torch.cat(o) for o in outs], ids


def test_engine_step_on_cuda_uses_the_kernels_and_matches_cpu():
    """A tiny model's steps (sparse prefill chunks, decodes below and above top-k) on CUDA, where
    ``step_attention`` runs the Triton kernels, equal the same steps on the CPU (PyTorch path)."""
    from tests.model.test_step import _close, _model
    from workers.kernels import attend

    calls = []
    real = attend.decode, attend.prefill_sparse
    lengths = [6, 20, 60]
    chunks = [[(0, 4)], [(1, 18)], [(2, 30)], [(2, 28)], [(0, 1), (1, 1), (2, 1)], [(0, 1), (1, 1), (2, 1)]]
    decodes = [0, 0, 0, 0, 3, 3]
    model = _model(8, seed=1)
    want, _ = _steps(model, "cpu", lengths, chunks, decodes)
    try:
        attend.decode = lambda *a: calls.append("decode") or real[0](*a)
        attend.prefill_sparse = lambda *a: calls.append("prefill") or real[1](*a)
        got, _ = _steps(model.cuda(), "cuda", lengths, chunks, decodes)
    finally:
        attend.decode, attend.prefill_sparse = real
    assert "decode" in calls and "prefill" in calls
    for g, w in zip(got, want):
        _close(g, w, tol=1e-3)
