"""EngineConfig: the knobs of one engine (frozen; the cluster's pydantic config maps onto it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["prefill", "decode", "both"]


@dataclass(frozen=True)
class EngineConfig:
    """Capacity and scheduling limits of one engine.

    ``num_blocks`` KV blocks of ``block_size`` tokens; each step runs at most
    ``max_num_batched_tokens`` tokens (decode tokens plus prefill chunks) for at most ``max_num_seqs``
    running sequences; ``max_model_len`` caps prompt + output (≤ the model's max positions).
    ``priority_aging_s``: seconds of waiting worth one level of ``GenerateRequest.priority`` when
    the scheduler picks whom to admit (see ``workers.engine.scheduler``).
    """

    num_blocks: int = 2048
    block_size: int = 64
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_queue: int = 1024
    lease_s: float = 30.0
    indexer_mode: Literal["exact", "fp8"] | None = None  # None: exact in float32, fp8 otherwise
    host_cache_blocks: int = 0  # context cache: evicted blocks kept in host memory (0: off)
    disk_cache_dir: str | None = None  # context cache on disk (None: off)
    disk_cache_blocks: int = 0
    # Context cache in a folder shared by every worker that mounts it (kvstore.shared_disk), bounded
    # by shared_disk_blocks in total across them; off unless both are set.
    shared_disk_dir: str | None = None
    shared_disk_blocks: int = 0
    # KV pool from a memory budget instead of num_blocks (workers/engine/kv_budget.py); at most one.
    kv_memory_bytes: int | None = None
    kv_memory_fraction: float | None = None
    priority_aging_s: float = 1.0
    # Pure-decode steps of up to this many sequences replay CUDA graphs (workers/engine/graphs.py) where
    # the model runs on CUDA with Triton; 0 runs every step eagerly (vLLM's --enforce-eager).
    cuda_graph_max_batch: int = 64

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine config {name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"engine config max_model_len must be ≥ 2, got {self.max_model_len}")
        if not self.priority_aging_s > 0:
            raise ValueError(f"engine config priority_aging_s must be > 0, got {self.priority_aging_s}")
        if self.kv_memory_bytes is not None and self.kv_memory_fraction is not None:
            raise ValueError("engine config: set kv_memory_bytes or kv_memory_fraction, not both")
        if self.kv_memory_bytes is not None and self.kv_memory_bytes < 1:
            raise ValueError(f"engine config kv_memory_bytes must be ≥ 1, got {self.kv_memory_bytes}")
        if self.kv_memory_fraction is not None and not 0 < self.kv_memory_fraction <= 1:
            raise ValueError(f"engine config kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        if self.cuda_graph_max_batch < 0:
            raise ValueError(f"engine config cuda_graph_max_batch must be ≥ 0, got {self.cuda_graph_max_batch}")
        if self.shared_disk_blocks < 0:
            raise ValueError(f"engine config shared_disk_blocks must be ≥ 0, got {self.shared_disk_blocks}")
        if self.lease_s <= 0:
            raise ValueError(f"engine config lease_s must be > 0, got {self.lease_s}")
