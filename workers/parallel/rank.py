"""One EP rank's life: load its share of the checkpoint, join the group, serve (or drive) forwards.

Used alike by local processes (``cluster.ep.LocalEPGroup``, torch.multiprocessing spawn) and by Ray
actors (``cluster.ep``): ``RankSpec`` is small and picklable, ``serve_rank`` is a plain function.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch

from workers.model.checkpoint import load_model
from workers.model.model import DeepseekV32

from .expert_parallel import ExpertParallel, parallelize
from .group import EPGroup, ExpertParallelError
from .placement import ExpertPlacement

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank needs to start. ``address:port`` is rank 0's rendezvous; ``timeout_s`` bounds
    the rendezvous and every collective."""

    model_dir: str
    rank: int
    size: int
    address: str
    port: int
    placement: ExpertPlacement
    dtype: str = "float32"
    device: str = "cpu"
    backend: str | None = None  # None: NCCL for a CUDA device, gloo otherwise
    timeout_s: float = 60.0
    load_mtp: bool = False
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.placement.ep_size != self.size:
            raise ValueError(f"placement is for {self.placement.ep_size} ranks, spec says {self.size}")


def start_rank(spec: RankSpec) -> tuple[DeepseekV32, ExpertParallel]:
    """Load this rank's share (everything but other ranks' experts), then join the group.

    Loading first lets every rank read its weights in parallel; the rendezvous then waits for the
    slowest (at most ``timeout_s``).
    """
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    model = load_model(spec.model_dir, dtype=DTYPES[spec.dtype], device=spec.device, load_mtp=spec.load_mtp,
                       experts=spec.placement.holds(spec.rank))
    group = EPGroup.init(spec.rank, spec.size, spec.address, spec.port, timeout_s=spec.timeout_s,
                         backend=spec.backend or ("nccl" if spec.device.startswith("cuda") else "gloo"), device=spec.device)
    return model, parallelize(model, spec.placement, group)


def run_expert_server(spec: RankSpec) -> None:
    """An expert-server rank (> 0): start, serve exchanges until rank 0 stops the group, leave.

    Raises ExpertParallelError when the group breaks (rank 0 died or hung, a peer vanished).
    """
    _, ep = start_rank(spec)
    try:
        ep.serve()
    finally:
        ep.close(stop_servers=False)


def serve_rank(spec: RankSpec) -> None:
    """Process entry point of an expert-server rank (``run_expert_server``): exits with status 1 and
    one log line when the group breaks, e.g. rank 0 died."""
    logging.basicConfig(level=logging.INFO, format=f"ep-rank-{spec.rank}: %(message)s")
    try:
        run_expert_server(spec)
    except ExpertParallelError as e:
        log.error("%s", e)
        sys.exit(1)
