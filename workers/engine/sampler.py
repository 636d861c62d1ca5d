"""Sampler: greedy, temperature, top-k, top-p, per-request seeds, top-n logprobs.

Logprobs are those of the model's own distribution (log-softmax of the raw logits), as vLLM reports
by default, whatever the sampling transforms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .types import SamplingParams, TokenLogprob


# Below this, dividing by the temperature can overflow float32 and the distribution is a one-hot of the
# argmax anyway: such temperatures sample greedily (vLLM uses the same threshold).
MIN_TEMPERATURE = 1e-5


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A per-request generator on the logits' ``device`` when the request has a seed (same seed → same
    tokens on the same device)."""
    if params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed)
    return g


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] (already divided by temperature) → logits with excluded tokens at -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
        drop = probs.cumsum(-1) - probs >= top_p
        drop[0] = False  # the most likely token always stays (a top_p below float32's range rounds to 0)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [N, V] (any float dtype; rows that need probabilities are converted to float32) → (one
    token id per row, its logprob entry or None per row)."""
    # On the raw dtype: a bf16 → float32 conversion is exact, so the greedy choice is the same. max()
    # returns the first maximal index like argmax(), and its bf16 CPU kernel is ~2.5× faster.
    greedy = logits.max(dim=-1).indices.tolist()
    tokens: list[int] = []
    for row, p in enumerate(params):
        if p.temperature < MIN_TEMPERATURE:
            tokens.append(greedy[row])
            continue
        scaled = _filter(logits[row].float() / p.temperature, p.top_k, p.top_p)
        probs = scaled.softmax(-1)
        if not bool(torch.isfinite(probs).all()):  # non-finite logits (e.g. overflow): never crash, pick greedily
            tokens.append(greedy[row])
            continue
        tokens.append(int(torch.multinomial(probs, 1, generator=generators[row]).item()))
    entries: list[TokenLogprob | None] = [None] * len(tokens)
    wanted = [row for row, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        logp = logits[wanted].float().log_softmax(-1)
        for i, row in enumerate(wanted):
            n = params[row].logprobs or 0
            top = logp[i].topk(n) if n else None
            entries[row] = TokenLogprob(
                token_id=tokens[row],
                logprob=float(logp[i, tokens[row]]),
                top=tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else (),
            )
    return tokens, entries
