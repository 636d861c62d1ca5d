"""When a sequence is finished: stop tokens, EOS, max_tokens, the context limit."""

from __future__ import annotations

from .types import FinishReason, SamplingParams


def finish_reason(
    params: SamplingParams, token: int, num_output: int, total_len: int, eos_token_id: int, max_model_len: int
) -> FinishReason | None:
    """The reason generation ends after ``token`` (the ``num_output``-th generated token), or None."""
    if token in params.stop_token_ids:
        return "stop"
    if token == eos_token_id and not params.ignore_eos:
        return "stop"
    if num_output >= params.max_tokens or total_len >= max_model_len:
        return "length"
    return None
