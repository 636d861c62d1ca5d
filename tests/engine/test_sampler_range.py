"""Sampling never fails on any value the request validation accepts (a crash here would stop the engine
for every request): property test over the whole accepted range of every sampling field."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.engine.sampler import make_generator, sample
from workers.engine.types import SamplingParams

VOCAB = 257

params = st.builds(
    SamplingParams,
    max_tokens=st.integers(1, 4),
    temperature=st.one_of(st.just(0.0), st.floats(0.0, 100.0, allow_subnormal=True), st.floats(1e-45, 1e-3)),
    top_p=st.one_of(st.just(1.0), st.floats(1e-300, 1.0, exclude_min=False).filter(lambda p: p > 0)),
    top_k=st.integers(0, VOCAB),
    seed=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    logprobs=st.one_of(st.none(), st.integers(0, SamplingParams.MAX_LOGPROBS)),
)
logit_scale = st.sampled_from([1e-3, 1.0, 30.0, 1e4, 1e30])


@settings(max_examples=300, deadline=None)
@given(p=params, scale=logit_scale, dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 1000))
def test_every_accepted_sampling_value_gives_a_token_and_finite_logprobs(p, scale, dtype, seed):
    p.validate(VOCAB)
    logits = (torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    tokens, entries = sample(logits, [p, p], [make_generator(p), make_generator(p)])
    assert all(0 <= t < VOCAB for t in tokens)
    for entry, token in zip(entries, tokens):
        if p.logprobs is None:
            assert entry is None
            continue
        assert entry.token_id == token and not math.isnan(entry.logprob) and entry.logprob <= 0
        assert len(entry.top) == p.logprobs and all(not math.isnan(lp) for _, lp in entry.top)


def test_tiny_temperature_and_top_p_sample_the_argmax():
    """The two values that used to stop the engine (temperature 1e-40; top_p 1e-300, which rounds to 0
    in float32) now pick the most likely token."""
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1))
    for p in (SamplingParams(temperature=1e-40), SamplingParams(temperature=0.7, top_p=1e-300)):
        tokens, _ = sample(logits, [p] * 3, [None] * 3)
        assert tokens == logits.argmax(-1).tolist()
