"""Sequence: one request's state inside an engine (token ids, block table, progress)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from kvstore.hashing import BlockHash, hash_block

from .types import GenerateRequest, TokenLogprob


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    LEASED = "leased"  # prefill done, blocks held for a decode worker
    FINISHED = "finished"


@dataclass
class Sequence:
    """Tokens ``token_ids`` = prompt + generated; ``num_computed_tokens`` of them are in the cache.

    A sequence needs ``len(token_ids) - num_computed_tokens`` tokens run; when that reaches zero
    after a forward, the next token is sampled.
    """

    request: GenerateRequest
    token_ids: list[int]
    prompt_len: int
    extra: bytes  # first-block hash extra (model id, cache salt)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    status: SeqStatus = SeqStatus.WAITING
    block_hashes: list[BlockHash] = field(default_factory=list)
    committed_blocks: int = 0
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    queue_s: float | None = None  # arrival → first scheduled (None: not yet, or imported KV)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    emitted: int = 0  # generated tokens already reported
    admitted_once: bool = False
    handoff: bool = False  # prefill role: hand the KV to a decode worker after the first token
    held_blocks: list[int] = field(default_factory=list)  # pulled prefix blocks, referenced until admission

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def full_block_hashes(self, block_size: int, upto_tokens: int) -> list[BlockHash]:
        """Hashes of the full blocks among the first ``upto_tokens`` tokens (extends the memo)."""
        n = upto_tokens // block_size
        while len(self.block_hashes) < n:
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if i else None
            tokens = self.token_ids[i * block_size : (i + 1) * block_size]
            self.block_hashes.append(hash_block(parent, tokens, self.extra if i == 0 else b""))
        return self.block_hashes[:n]
