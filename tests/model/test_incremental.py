"""Decoding with a cache gives the logits of the full forward; absorbed attention equals MHA mode."""

from __future__ import annotations

import pytest
import torch

from workers.model import load_model
from workers.model.cache import KVCache

from .hf_reference import hf_model, rel_err, save_hf


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(save_hf(hf_model(seed=3), tmp_path_factory.mktemp("m")))


def _ids(b, s, seed=0):
    return torch.randint(0, 512, (b, s), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def test_token_by_token_decode_equals_full_forward(model):
    ids = _ids(2, 30)
    full = model.logits(ids)
    cache = model.new_cache(2, 64)
    assert isinstance(cache, KVCache)
    steps = [model(ids[:, :4], torch.arange(4).expand(2, 4), cache)]
    for t in range(4, 30):
        steps.append(model(ids[:, t : t + 1], torch.full((2, 1), t), cache))
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


@torch.inference_mode()
def test_chunked_prefill_equals_full_forward(model):
    ids = _ids(1, 45, seed=1)
    full = model.logits(ids)
    cache = model.new_cache(1, 64)
    chunks = [model(ids[:, lo : lo + 16], torch.arange(lo, min(lo + 16, 45))[None], cache) for lo in range(0, 45, 16)]
    assert rel_err(torch.cat(chunks, dim=1), full) < 1e-5


@torch.inference_mode()
def test_ragged_batch_decode_matches_each_sequence_alone(model):
    """Two prompts of different lengths share one batch (the shorter right-padded); each decode step
    matches its own full forward, because padding slots sit at positions the query cannot see."""
    a, b = _ids(1, 20, seed=2), _ids(1, 12, seed=3)
    padded = torch.cat((a, torch.cat((b, torch.zeros(1, 8, dtype=torch.long)), dim=1)))
    cache = model.new_cache(2, 64)
    model(padded, torch.arange(20).expand(2, 20), cache)
    nxt = torch.tensor([[7], [9]])
    step = model(nxt, torch.tensor([[20], [12]]), cache)
    ref_a = model.logits(torch.cat((a, nxt[:1]), dim=1))[0, -1]
    ref_b = model.logits(torch.cat((b, nxt[1:]), dim=1))[0, -1]
    assert rel_err(step[0, -1], ref_a) < 1e-5
    assert rel_err(step[1, -1], ref_b) < 1e-5


@torch.inference_mode()
@pytest.mark.parametrize("seq", [6, 30], ids=["within-topk", "sparse"])
def test_absorbed_decode_equals_mha_mode(model, seq):
    ids = _ids(2, seq, seed=4)
    model.configure(attention="dense")
    mha = model.logits(ids)
    model.configure(attention="sparse")
    cache = model.new_cache(2, 64)
    steps = [model(ids[:, t : t + 1], torch.full((2, 1), t), cache) for t in range(seq)]
    assert rel_err(torch.cat(steps, dim=1), mha) < 1e-5
