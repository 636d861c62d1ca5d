"""Typed objects that cross the engine's boundary: requests, sampling parameters, outputs, KV handles, stats.

Plain dataclasses (no Ray, no protobuf): the router converts protobuf at the wire; Ray passes these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from kvstore.handle import KVHandle, LayoutFingerprint  # re-exported: the engine's boundary types

FinishReason = Literal["stop", "length", "abort", "error"]


class RequestError(ValueError):
    """A request field is invalid. ``field`` names it; the message says the limit."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class WorkerError(RuntimeError):
    """A worker finished a request with an error (capacity, transfer); other requests go on."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` are off."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n log-probabilities per generated token

    MAX_LOGPROBS = 20

    def validate(self, vocab_size: int) -> None:
        """Raise RequestError naming the first bad field and its limit."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError("max_tokens", f"must be ≥ 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            raise RequestError("temperature", f"must be in [0, 100], got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise RequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not (0 <= self.top_k <= vocab_size):
            raise RequestError("top_k", f"must be in [0, {vocab_size}] (0 = off), got {self.top_k}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise RequestError("seed", f"must be in [0, 2^63), got {self.seed}")
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                raise RequestError("stop_token_ids", f"token id {t} outside the vocabulary [0, {vocab_size})")
        if any(not s for s in self.stop):
            raise RequestError("stop", "stop strings must be non-empty")
        if self.logprobs is not None and not 0 <= self.logprobs <= self.MAX_LOGPROBS:
            raise RequestError("logprobs", f"must be in [0, {self.MAX_LOGPROBS}], got {self.logprobs}")


@dataclass(frozen=True)
class GenerateRequest:
    """One generation request, already tokenized."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    cache_salt: str | None = None
    priority: int = 0


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the top-n alternatives


@dataclass(frozen=True)
class RequestOutput:
    """An increment of a request's output: the new tokens since the last output of that request.

    The last output of a request has ``finished`` set and ``finish_reason``; ``error`` explains an
    ``"error"`` finish. ``ttft_s`` is set once the first token exists.
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    usage: Usage
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    ttft_s: float | None = None
    error: str | None = None
    queue_s: float | None = None  # arrival at this engine → first scheduled; set once scheduled


@dataclass(frozen=True)
class TransferStats:
    """A worker's KV transfer counters: the reader's on a decode worker, the holder's on a prefill one."""

    backend: str = "none"
    bytes: int = 0  # completed transfers only
    transfers: int = 0
    failures: int = 0
    seconds: float | None = None  # spent in successful reads; only NIXL's reader measures it

    def to_json(self) -> dict:
        out = {"backend": self.backend, "bytes": self.bytes, "transfers": self.transfers, "failures": self.failures}
        if self.seconds is not None:
            out["seconds"] = self.seconds
        return out

    @classmethod
    def from_json(cls, d: dict) -> TransferStats:
        return cls(d["backend"], d["bytes"], d["transfers"], d["failures"], d.get("seconds"))


@dataclass(frozen=True)
class WorkerStats:
    """A worker's load and health, as routing, the planner and ``dsaserve status`` see it.

    ``to_json()`` is the worker entry of ``dsaserve status --json`` (a CLI contract: keep every key and
    its meaning); ``from_json`` reads it back where stats crossed Ray or gRPC as JSON. ``healthy``,
    ``indexed`` and ``ep`` are the serving process's to set; an engine reports the rest.
    """

    worker_id: str
    role: str
    waiting: int  # requests not yet scheduled, KV imports included
    running: int
    free_blocks: int
    total_blocks: int
    tokens_per_s: float = 0.0  # tokens computed per second since start, to 0.01
    requests_total: int = 0
    queued_tokens: int = 0  # prompt tokens still to prefill, waiting and running
    healthy: bool = True
    indexed: bool | None = None  # the KV index has its current blocks; None: no index
    kv_transfer: TransferStats = field(default_factory=TransferStats)
    ep: dict | None = None  # expert parallelism (``ExpertParallel.stats`` and the ranks' pids); None: one process
    weight_bytes: int = 0  # resident bytes of the model's parameters and buffers on this worker
    kv_bytes_per_token: float = 0.0  # KV cache bytes one token takes (all layers)
    context_cache_hits: dict[str, int] = field(default_factory=dict)  # blocks restored, per tier; {}: no tiers
    peer_pulls: dict[str, int] = field(default_factory=dict)  # pulled/exported prefix blocks (workers.engine.peer)
    step_tokens: int = 0  # token budget of one engine step (a peer's export waits for the current step)
    disk_volume: str | None = None  # the shared disk cache folder it reads and writes (its volume id)

    def to_json(self) -> dict:
        out = {
            "id": self.worker_id, "role": self.role, "requests_total": self.requests_total, "running": self.running,
            "waiting": self.waiting, "free_blocks": self.free_blocks, "total_blocks": self.total_blocks,
            "tokens_per_s": self.tokens_per_s, "queued_tokens": self.queued_tokens,
            "kv_transfer": self.kv_transfer.to_json(), "healthy": self.healthy, "indexed": self.indexed,
            "weight_bytes": self.weight_bytes, "kv_bytes_per_token": self.kv_bytes_per_token,
        }
        if self.ep is not None:
            out["ep"] = self.ep
        if self.context_cache_hits:
            out["context_cache_hits"] = dict(self.context_cache_hits)
        if self.peer_pulls:
            out["peer_pulls"] = dict(self.peer_pulls)
        if self.step_tokens:
            out["step_tokens"] = self.step_tokens
        if self.disk_volume is not None:
            out["disk_volume"] = self.disk_volume
        return out

    @classmethod
    def from_json(cls, d: dict) -> WorkerStats:
        return cls(
            worker_id=d["id"], role=d["role"], waiting=d["waiting"], running=d["running"],
            free_blocks=d["free_blocks"], total_blocks=d["total_blocks"], tokens_per_s=d["tokens_per_s"],
            requests_total=d["requests_total"], queued_tokens=d["queued_tokens"], healthy=d["healthy"],
            indexed=d["indexed"], kv_transfer=TransferStats.from_json(d["kv_transfer"]), ep=d.get("ep"),
            weight_bytes=d.get("weight_bytes", 0), kv_bytes_per_token=d.get("kv_bytes_per_token", 0.0),
            context_cache_hits=dict(d.get("context_cache_hits") or {}), peer_pulls=dict(d.get("peer_pulls") or {}),
            step_tokens=d.get("step_tokens", 0), disk_volume=d.get("disk_volume"),
        )
