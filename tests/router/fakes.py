"""A scripted ``Backend`` for Frontend unit tests (no model): it emits given tokens one per step."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

from router.backend import AdmissionError, ModelInfo
from workers.engine.types import GenerateRequest, RequestOutput, Usage

INFO = ModelInfo(
    model_id="fake",
    vocab_size=129280,
    max_context=64,
    max_tokens_limit=32,
    max_queue=4,
    block_size=64,
    eos_token_id=1,
    bos_token_id=0,
    index_topk=32,
    has_tokenizer=True,
)


class FakeBackend:
    """Yields ``script(request)`` one token per increment (cut at max_tokens, finish "length").

    Records closed request ids in ``closed``, and raises AdmissionError while ``full`` is set.
    """

    def __init__(self, script: Callable[[GenerateRequest], Sequence[int]], info: ModelInfo = INFO, delay: float = 0.0):
        self.script = script
        self._info = info
        self.delay = delay
        self.full = False
        self.closed: list[str] = []
        self.requests: list[GenerateRequest] = []

    def info(self) -> ModelInfo:
        return self._info

    def stats(self) -> dict:
        return {}

    async def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        if self.full:
            raise AdmissionError("queue full", retry_after_s=0.5)
        self.requests.append(req)
        tokens = list(self.script(req))[: req.params.max_tokens]
        n = len(req.prompt_token_ids)
        try:
            for i, t in enumerate(tokens):
                await asyncio.sleep(self.delay)
                last = i == len(tokens) - 1
                yield RequestOutput(
                    req.request_id, (t,), last, Usage(n, 0, i + 1), "length" if last else None, ttft_s=0.001
                )
        finally:
            self.closed.append(req.request_id)
