"""EPGroup: one rank's view of an expert-parallel process group, with the all-to-all EP needs.

Every collective runs under the group's timeout: a peer that dies closes its sockets and the next
collective fails at once; a peer that hangs fails it after ``timeout_s``. Either way the group turns
*broken* (``error``), every later call raises ``ExpertParallelError`` immediately, and nothing waits
forever. gloo on CPU, NCCL on GPU; ``torch.distributed``'s default group, so one EP group per process.
"""

from __future__ import annotations

import datetime
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

JOIN_TIMEOUT_S = 60.0  # how long ranks may take to arrive, whatever the collectives' timeout


class ExpertParallelError(RuntimeError):
    """An expert-parallel rank died, hung or fell out of step; the replica cannot run forwards."""


@dataclass
class Traffic:
    """All-to-all counters of one rank: payload bytes sent to *other* ranks and seconds in collectives."""

    collectives: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0


class EPGroup:
    """Rank ``rank`` of ``size`` expert-parallel ranks. ``lock`` serializes exchanges across threads
    (the engine's forward and the heartbeat): collectives must run in the same order on every rank."""

    def __init__(self, rank: int, size: int, *, timeout_s: float, device: torch.device | str = "cpu") -> None:
        self.rank, self.size, self.timeout_s = rank, size, timeout_s
        self.device = torch.device(device)
        self.lock = threading.RLock()
        self.traffic = Traffic()
        self.error: str | None = None
        self._initialized = False

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "EPGroup":
        """A group of one rank: no communication (all-to-all is a copy)."""
        return cls(0, 1, timeout_s=float("inf"), device=device)

    @classmethod
    def init(
        cls, rank: int, size: int, address: str, port: int, *, timeout_s: float = 60.0,
        backend: str = "gloo", device: torch.device | str = "cpu",
    ) -> "EPGroup":
        """Join the group (TCP rendezvous at ``address:port``, served by rank 0); waits at most
        ``max(timeout_s, JOIN_TIMEOUT_S)`` for every rank to arrive (a rank that is still starting, its
        imports on a loaded machine, is not a hung peer), then runs collectives under ``timeout_s``."""
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"rank {rank} is outside a group of {size}")
        group = cls(rank, size, timeout_s=timeout_s, device=device)
        if size == 1:
            return group
        if dist.is_initialized():
            raise ExpertParallelError("this process already belongs to a process group (one EP group per process)")
        try:
            store = dist.TCPStore(address, port, world_size=size, is_master=rank == 0, wait_for_workers=True,
                                  timeout=datetime.timedelta(seconds=max(timeout_s, JOIN_TIMEOUT_S)))
            dist.init_process_group(backend, store=store, rank=rank, world_size=size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:  # DistStoreError is a RuntimeError
            raise ExpertParallelError(f"EP rank {rank}/{size}: could not join the group at {address}:{port} ({e})") from None
        group._initialized = True
        return group

    @property
    def healthy(self) -> bool:
        return self.error is None

    def check(self) -> None:
        if self.error is not None:
            raise ExpertParallelError(self.error)

    def fail(self, message: str) -> ExpertParallelError:
        """Mark the group broken (first message wins) and return the error to raise."""
        if self.error is None:
            self.error = message
        return ExpertParallelError(self.error)

    def all_to_all(self, inp: torch.Tensor, out_splits: Sequence[int] | None = None, in_splits: Sequence[int] | None = None) -> torch.Tensor:
        """``dist.all_to_all_single`` along dim 0: rows ``in_splits[j]`` go to rank j; the result holds
        ``out_splits[i]`` rows from rank i, in rank order. None = equal splits."""
        if out_splits is None:
            out = torch.empty_like(inp)
        else:
            out = inp.new_empty((sum(out_splits), *inp.shape[1:]))
        if self.size == 1:
            out.copy_(inp)
            return out
        start = time.perf_counter()
        dist.all_to_all_single(out, inp.contiguous(), None if out_splits is None else list(out_splits),
                               None if in_splits is None else list(in_splits))
        row = math.prod(inp.shape[1:]) * inp.element_size()
        own = in_splits[self.rank] if in_splits is not None else inp.shape[0] // self.size
        self.traffic.collectives += 1
        self.traffic.bytes_sent += (inp.shape[0] - own) * row
        self.traffic.seconds += time.perf_counter() - start
        return out

    def close(self) -> None:
        """Leave the group (local teardown; peers notice their sockets closing)."""
        if self._initialized and dist.is_initialized():
            dist.destroy_process_group()
        self._initialized = False
