"""KVHandle and LayoutFingerprint: how a holder describes prefilled KV blocks to a reader.

They live in ``kvstore`` (the lowest package) because transfer backends read them; the engine and the
router import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayoutFingerprint:
    """What must agree for KV blocks to be meaningful on another worker."""

    model_id: str
    dtype: str
    index_dtype: str
    block_size: int
    hash_version: int
    num_layers: int
    bytes_per_block: int


@dataclass(frozen=True)
class KVHandle:
    """The prefilled KV of one request, held by a prefill worker under a lease until released.

    ``block_ids`` are the holder's block ids (ceil(num_tokens / block_size) of them); ``first_token``
    is the token sampled after the prompt; ``endpoint`` describes how to read the blocks (a transfer
    backend's own data: an agent name and metadata, an object ref, or a local pool id).

    The lease ends at ``lease_expires_at`` (``time.time()`` on the holder); after that, or once
    released, the holder may reuse the blocks, so readers refuse a handle past it.
    ``block_generations`` are the holder pool's generations of ``block_ids`` at hand-off
    (``BlockPool.generations``): a reader that can see the holder's pool compares them again to
    detect reused blocks; empty when the holder did not record them.

    A *prefix export* (a peer pull, ``first_token == -1``) holds prompt blocks ``first_block ..`` of
    some request, named by ``block_hashes``; the reader checks those against its own hashes of the
    prompt before committing the blocks under them.
    """

    worker_id: str
    request_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
    first_token: int
    fingerprint: LayoutFingerprint
    lease_expires_at: float
    cached_tokens: int = 0
    first_logprob: object | None = None  # the engine's TokenLogprob of first_token, carried opaquely
    endpoint: dict = field(default_factory=dict)
    block_generations: tuple[int, ...] = ()
    first_block: int = 0  # a prefix export: the prompt block the first of ``block_ids`` holds
    block_hashes: tuple[bytes, ...] = ()  # a prefix export: the chained hash of each block
