"""Logits parity with transformers' DeepseekV32ForCausalLM on random checkpoints it saved itself."""

from __future__ import annotations

import pytest
import torch

from workers.model import load_model

from .hf_reference import hf_logits, hf_model, rel_err, save_hf

TOL = 1e-4  # relative to the largest logit, float32


@pytest.fixture(scope="module")
def yarn_pair(tmp_path_factory):
    hf = hf_model(seed=0)
    path = save_hf(hf, tmp_path_factory.mktemp("yarn"))
    return hf, load_model(path)


@pytest.mark.parametrize(
    "batch, seq",
    [(1, 6), (2, 8), (2, 40), (3, 33)],
    ids=["short-dense", "exactly-topk", "sparse-batch2", "sparse-batch3"],
)
@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_logits_match_transformers_with_yarn(yarn_pair, batch, seq, attention):
    hf, ours = yarn_pair
    ours.configure(attention=attention)
    ids = torch.randint(0, hf.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seq))
    assert rel_err(ours.logits(ids), hf_logits(hf, ids)) < TOL


def test_logits_match_transformers_without_yarn(tmp_path):
    hf = hf_model(seed=1, yarn=False)
    ours = load_model(save_hf(hf, tmp_path))
    assert ours.config.rope_scaling is None
    ids = torch.randint(0, hf.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    assert rel_err(ours.logits(ids), hf_logits(hf, ids)) < TOL


def test_sparse_selection_changes_the_output(yarn_pair):
    """Guards the parity tests against a vacuous pass: with S > index_topk the indexer must matter."""
    hf, ours = yarn_pair
    ids = torch.randint(0, hf.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    sparse = ours.logits(ids)
    for layer in ours.layers:
        layer.attn.topk = 10_000  # attend to everything: plain dense causal MLA
    try:
        dense = ours.logits(ids)
    finally:
        for layer in ours.layers:
            layer.attn.topk = ours.config.index_topk
    assert rel_err(sparse[:, 8:], dense[:, 8:]) > 1e-3
    assert rel_err(sparse[:, :8], dense[:, :8]) < 1e-5  # within topk the two are the same
