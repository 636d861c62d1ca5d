"""Disaggregated prefill → decode for one request, with fallbacks.

1. The prefill worker runs the prompt and returns a leased ``KVHandle`` with the first token, which
   is streamed at once (that is the time to first token).
2. The decode worker reads the blocks (KV transfer), the lease is released, decoding continues.
3. A failed read never yields garbage: the decode worker recomputes the prompt plus the first token
   itself (conditional fallback); only when that fails too does the client see an error.

A peer pull (``prefix``) is read by the prefill worker before it runs the prompt (``workers.engine.peer``);
a failed pull only means the prefix is computed there.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Protocol

from workers.engine.stop import finish_reason
from workers.engine.types import GenerateRequest, KVHandle, RequestOutput, Usage, WorkerError

log = logging.getLogger(__name__)


class PrefillWorker(Protocol):
    """Contract: ``prefill`` returns a handle whose blocks stay leased until ``release``; with a
    ``prefix`` handle it first reads those blocks (or computes them when the read fails)."""

    async def prefill(self, request: GenerateRequest, prefix: KVHandle | None = None) -> KVHandle: ...

    def release(self, request_id: str) -> None: ...


class PrefixHolder(Protocol):
    """A worker a peer may pull prompt blocks from. Contract: ``export`` leases the longest prefix of
    ``hashes`` it holds and returns its handle (None: it holds none), or raises when the worker is
    unreachable; ``release(lease_id)`` ends that lease early (fire and forget; the lease expires anyway)."""

    async def export(self, request_id: str, hashes: list[bytes], first_block: int) -> KVHandle | None: ...

    def release(self, lease_id: str) -> None: ...


class DecodeWorker(Protocol):
    """Contract: ``decode`` reads the handle's blocks (calling ``on_read`` once, with the error or
    None), raises the read error, then yields outputs; ``generate`` runs a whole request."""

    def decode(self, request: GenerateRequest, handle: KVHandle, on_read) -> AsyncIterator[RequestOutput]: ...

    def generate(self, request: GenerateRequest, prefix: KVHandle | None = None) -> AsyncIterator[RequestOutput]: ...


async def generate_disaggregated(
    request: GenerateRequest,
    prefill: PrefillWorker,
    decode: DecodeWorker,
    *,
    eos_token_id: int,
    max_model_len: int,
    prefix: KVHandle | None = None,
) -> AsyncIterator[RequestOutput]:
    """Yield the request's outputs: the first token from prefill, the rest from decode."""
    start = time.monotonic()
    params = request.params
    prompt_len = len(request.prompt_token_ids)
    try:
        handle = await prefill.prefill(request, prefix)
    except WorkerError as e:
        yield RequestOutput(request_id=request.request_id, new_token_ids=(), finished=True,
                            usage=Usage(prompt_len, 0, 0), finish_reason="error", error=str(e))
        return
    ttft = time.monotonic() - start
    reason = finish_reason(params, handle.first_token, 1, prompt_len + 1, eos_token_id, max_model_len)
    first = RequestOutput(
        request_id=request.request_id, new_token_ids=(handle.first_token,), finished=reason is not None,
        usage=Usage(prompt_len, handle.cached_tokens, 1), finish_reason=reason,
        logprobs=(handle.first_logprob,) if handle.first_logprob else (), ttft_s=ttft,
    )
    if reason is not None:
        prefill.release(request.request_id)
        yield first
        return
    try:
        yield first
    except BaseException:  # closed right after the first token: drop the lease now, not at expiry
        prefill.release(request.request_id)
        raise

    released = False

    def on_read(_err: Exception | None) -> None:
        nonlocal released
        released = True
        prefill.release(request.request_id)  # read or failed: the holder's blocks are no longer needed

    try:
        # aclosing: when our caller stops early, the decode stream closes now (aborting the request
        # and freeing its blocks), not whenever the garbage collector finalizes it.
        async with aclosing(decode.decode(request, handle, on_read)) as outs:
            async for out in outs:
                yield dataclasses.replace(out, ttft_s=ttft)
        return
    except (RuntimeError, ValueError) as e:
        log.warning("KV transfer for %s failed (%s); recomputing on the decode worker", request.request_id, e)
    finally:
        if not released:
            prefill.release(request.request_id)
    async for out in _recompute(request, handle, decode, ttft):
        yield out


async def _recompute(request: GenerateRequest, handle: KVHandle, decode: DecodeWorker, ttft: float) -> AsyncIterator[RequestOutput]:
    """Run prompt + first token as a fresh request on the decode worker; report usage as the original."""
    async for out in continue_request(request, (handle.first_token,), decode, cached_tokens=handle.cached_tokens, ttft=ttft):
        yield out


async def continue_request(
    request: GenerateRequest,
    sent: tuple[int, ...],
    worker: DecodeWorker,
    *,
    cached_tokens: int = 0,
    ttft: float | None = None,
) -> AsyncIterator[RequestOutput]:
    """Continue ``request`` after the tokens already ``sent`` to the client, recomputing its KV on
    ``worker``: the stream goes on where it stopped and never repeats a token. Usage is reported as
    for the original request. A seeded sampler restarts its random stream (greedy output is exact).
    """
    prompt_len = len(request.prompt_token_ids)
    rest = dataclasses.replace(
        request,
        prompt_token_ids=tuple(request.prompt_token_ids) + tuple(sent),
        params=dataclasses.replace(request.params, max_tokens=request.params.max_tokens - len(sent)),
    )
    async with aclosing(worker.generate(rest)) as outs:
        async for out in outs:
            usage = Usage(prompt_len, cached_tokens, out.usage.completion_tokens + len(sent))
            yield dataclasses.replace(out, usage=usage, ttft_s=ttft if ttft is not None else out.ttft_s)
