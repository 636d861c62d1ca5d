"""OutputProcessor: turns sampled tokens into ``RequestOutput`` increments for each caller.

It owns the callers' sinks. A sink that raises (its caller is gone, e.g. an event loop closed) never
stops the engine: delivery reports False and the engine frees that request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kvstore.handle import KVHandle

from .sequence import Sequence
from .stop import finish_reason
from .types import FinishReason, GenerateRequest, RequestOutput, TokenLogprob, Usage

Sink = Callable[[RequestOutput | KVHandle], None]
log = logging.getLogger(__name__)


class OutputProcessor:
    """Per-request sinks, finish decisions and output increments (engine thread)."""

    def __init__(self, eos_token_id: int, max_model_len: int) -> None:
        self.eos_token_id, self.max_model_len = eos_token_id, max_model_len
        self.sinks: dict[str, Sink] = {}

    def register(self, request_id: str, sink: Sink) -> None:
        self.sinks[request_id] = sink

    def unregister(self, request_id: str) -> Sink | None:
        return self.sinks.pop(request_id, None)

    @staticmethod
    def send(request_id: str, sink: Sink, item: RequestOutput | KVHandle) -> bool:
        """Deliver to the caller; False when the caller is gone."""
        try:
            sink(item)
            return True
        except Exception:  # a vanished caller must never stop the engine
            log.info("caller of %s is gone; dropping the request", request_id)
            return False

    @staticmethod
    def error_output(request: GenerateRequest, message: str) -> RequestOutput:
        return RequestOutput(request_id=request.request_id, new_token_ids=(), finished=True,
                             usage=Usage(len(request.prompt_token_ids), 0, 0), finish_reason="error", error=message)

    def append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> FinishReason | None:
        """Add a sampled token to ``seq``; → why it finished, or None."""
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        return finish_reason(seq.request.params, token, seq.num_output_tokens, len(seq.token_ids),
                             self.eos_token_id, self.max_model_len)

    def emit(self, seq: Sequence, reason: FinishReason | None, error: str | None = None) -> bool:
        """Send the tokens not yet reported; False when nobody listens any more."""
        new = tuple(seq.token_ids[seq.prompt_len + seq.emitted :])
        lps = tuple(seq.logprobs[seq.emitted :]) if seq.logprobs else ()
        seq.emitted = seq.num_output_tokens
        ttft = None if seq.first_token_time is None else seq.first_token_time - seq.arrival
        sink = self.sinks.get(seq.request_id)
        if sink is None:
            return False
        return self.send(seq.request_id, sink, RequestOutput(
            request_id=seq.request_id, new_token_ids=new, finished=reason is not None,
            usage=Usage(seq.prompt_len, seq.num_cached_tokens, seq.num_output_tokens),
            finish_reason=reason, logprobs=lps, ttft_s=ttft, error=error, queue_s=seq.queue_s,
        ))
