"""Expert-parallel replicas: N ranks serve one model, rank 0 runs the engine, ranks 1..N-1 serve experts.

Execution model (one replica): rank 0 runs the engines (scheduler, paged KV, attention, dense layers,
shared experts) on every token and, at each MoE layer, dispatches the (token, expert) rows to the ranks
holding those experts (``workers.parallel``); ranks 1..N-1 hold their experts and serve exchanges
until rank 0 stops them. So the engine, the KV cache and KV transfer are exactly those of one device.

- ``LocalEPGroup``: ranks 1..N-1 as local processes (torch.multiprocessing spawn, gloo) — what
  ``dsaserve generate --ep-size N`` runs.
- ``EPLocalBackend``: ``LocalBackend`` whose model is rank 0 of a ``LocalEPGroup``; it reports
  unhealthy once a rank dies (the request in flight ends with an error, nothing hangs).
- ``RayEPGroup``: in cluster mode, the Serve replica is rank 0 and ranks 1..N-1 are Ray actors in the
  bundles 1..N-1 of the replica's placement group (``serve_options`` adds the bundles to the
  deployment), so Ray places, and removes, a replica's ranks together. Ray is imported lazily: local
  mode never imports it.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from cluster.local import LocalBackend, default_model_dir
from router.policy import RoutingConfig
from workers.engine.config import EngineConfig
from workers.model.config import ModelConfig
from workers.model.model import DeepseekV32
from workers.parallel import (
    ExpertParallel,
    ExpertParallelError,
    ExpertPlacement,
    RankSpec,
    run_expert_server,
    serve_rank,
    start_rank,
)

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 60.0
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalEPGroup:
    """An EP group on this machine: this process is rank 0, ranks 1..N-1 are spawned processes.

    Args:
        model_dir: the checkpoint every rank reads its share of.
        ep_size: ranks, N.
        placement: the plan (default: contiguous); must be for ``ep_size`` ranks.
        dtype: weight dtype, ``"float32"`` or ``"bfloat16"``.
        timeout_s: rendezvous and collective timeout — how long a hung rank can stall a request.
        worker_threads: torch threads per spawned rank (default: this machine's CPUs / N).
    """

    def __init__(self, model_dir: str | Path, ep_size: int, *, placement: ExpertPlacement | None = None,
                 dtype: str = "float32", timeout_s: float = DEFAULT_TIMEOUT_S, worker_threads: int | None = None) -> None:
        self.model_dir = Path(model_dir)
        config = ModelConfig.from_hf(self.model_dir)
        # Checked before any process starts: an impossible plan is a PlacementError here.
        self.placement = placement or ExpertPlacement.contiguous(config.n_routed_experts, ep_size)
        if self.placement.ep_size != ep_size or self.placement.n_experts != config.n_routed_experts:
            raise ValueError(
                f"placement is for {self.placement.ep_size} ranks × {self.placement.n_experts} experts; this group "
                f"has {ep_size} ranks and the model {config.n_routed_experts} experts"
            )
        self.ep_size, self.dtype, self.timeout_s = ep_size, dtype, timeout_s
        self.worker_threads = worker_threads or max(1, (os.cpu_count() or 1) // ep_size)
        self.processes: list[mp.process.BaseProcess] = []
        self.model: DeepseekV32 | None = None
        self.ep: ExpertParallel | None = None

    def start(self) -> "LocalEPGroup":
        port = free_port()
        specs = [
            RankSpec(str(self.model_dir), rank, self.ep_size, "127.0.0.1", port, self.placement, dtype=self.dtype,
                     timeout_s=self.timeout_s, torch_threads=self.worker_threads if rank else None)
            for rank in range(self.ep_size)
        ]
        ctx = mp.get_context("spawn")
        try:
            for spec in specs[1:]:
                proc = ctx.Process(target=serve_rank, args=(spec,), daemon=True, name=f"dsaserve-ep-rank-{spec.rank}")
                proc.start()
                self.processes.append(proc)
            self.model, self.ep = start_rank(specs[0])
        except BaseException:
            self.close()
            raise
        self.ep.start_heartbeat()
        return self

    @property
    def pids(self) -> list[int]:
        """Process ids of ranks 1..N-1."""
        return [p.pid for p in self.processes if p.pid is not None]

    def health_error(self) -> str | None:
        """Why the group cannot serve (a rank exited, the group broke), or None."""
        for rank, proc in enumerate(self.processes, start=1):
            if proc.exitcode is not None:
                return f"expert-parallel rank {rank} exited (status {proc.exitcode})"
        return None if self.ep is None or self.ep.error is None else self.ep.error

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the expert servers and reap their processes (terminated if they do not return)."""
        if self.ep is not None:
            self.ep.close()
        for proc in self.processes:
            proc.join(timeout_s)
            if proc.exitcode is None:
                proc.terminate()
                proc.join(2.0)


class EPLocalBackend(LocalBackend):
    """Local mode on an expert-parallel replica: ``LocalBackend`` serving rank 0 of a ``LocalEPGroup``."""

    def __init__(self, model_dir: Path, engine_config: EngineConfig, *, ep_size: int,
                 placement: ExpertPlacement | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 disaggregate: bool = True, dtype: torch.dtype = torch.float32,
                 routing: RoutingConfig | None = None) -> None:
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
        self.ep_group = LocalEPGroup(model_dir, ep_size, placement=placement, dtype=_DTYPE_NAMES[dtype],
                                     timeout_s=timeout_s).start()
        try:
            super().__init__(model_dir, engine_config, disaggregate=disaggregate, dtype=dtype, routing=routing,
                             model=self.ep_group.model)
        except BaseException:
            self.ep_group.close()
            raise

    @classmethod
    def start(cls, model_dir: str | Path | None = None, *, ep_size: int = 2, engine_config: EngineConfig | None = None,
              placement: ExpertPlacement | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
              disaggregate: bool = True, routing: RoutingConfig | None = None,
              dtype: torch.dtype = torch.float32) -> "EPLocalBackend":
        path = Path(model_dir) if model_dir is not None else default_model_dir()
        return cls(path, engine_config or EngineConfig(), ep_size=ep_size, placement=placement, timeout_s=timeout_s,
                   disaggregate=disaggregate, routing=routing, dtype=dtype)

    @property
    def ep(self) -> ExpertParallel:
        assert self.ep_group.ep is not None
        return self.ep_group.ep

    def health_error(self) -> str | None:
        return super().health_error() or self.ep_group.health_error()

    def stats(self) -> dict:
        return {**super().stats(), "ep": self.ep.stats()}

    def close(self) -> None:
        super().close()
        self.ep_group.close()


# ---------------------------------------------------------------------------------------------- Ray
def serve_options(ep_size: int, num_cpus: float, num_gpus: float, resources: dict[str, float] | None = None) -> dict:
    """Serve deployment options for replicas of ``ep_size`` ranks: one placement-group bundle per
    rank (bundle 0 is the replica itself; each holds a rank's CPUs, GPUs and custom resources),
    packed onto as few nodes as possible."""
    if ep_size <= 1:
        return {}
    bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {}), **(resources or {})}
    return {"placement_group_bundles": [dict(bundle) for _ in range(ep_size)], "placement_group_strategy": "PACK"}


class _RankActor:
    """Ray actor of one expert-server rank; ``serve`` runs until rank 0 stops the group (two
    concurrent calls: ``pid`` answers while ``serve`` runs)."""

    def pid(self) -> int:
        return os.getpid()

    def serve(self, spec: RankSpec) -> None:
        torch.set_num_threads(spec.torch_threads or 1)
        run_expert_server(spec)


class RayEPGroup:
    """An EP group inside a Serve replica (which must run in a placement group of ``ep_size`` bundles,
    see ``serve_options``): this actor is rank 0; ranks 1..N-1 are ``_RankActor``s in bundles 1..N-1.

    Rank-actor death reaches rank 0 as a failed exchange (its sockets close) or, for a hung rank,
    after ``timeout_s``; ``health_error`` also reports a rank whose ``serve`` call ended.
    """

    def __init__(self, model_dir: str | Path, ep_size: int, *, num_cpus: float, num_gpus: float = 0,
                 resources: dict[str, float] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 dtype: str = "float32", torch_threads: int = 1) -> None:
        self.model_dir = Path(model_dir)
        config = ModelConfig.from_hf(self.model_dir)
        self.placement = ExpertPlacement.contiguous(config.n_routed_experts, ep_size)
        self.ep_size, self.timeout_s, self.dtype = ep_size, timeout_s, dtype
        self.num_cpus, self.num_gpus, self.torch_threads = num_cpus, num_gpus, torch_threads
        self.resources = dict(resources or {})
        self.actors: list = []
        self._runs: list = []
        self.pids: list[int] = []  # process id of each rank, rank 0 first
        self.model: DeepseekV32 | None = None
        self.ep: ExpertParallel | None = None

    def start(self) -> "RayEPGroup":
        import ray
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = get_current_placement_group()
        if pg is None or len(pg.bundle_specs) < self.ep_size:
            raise ExpertParallelError(
                f"ep_size {self.ep_size} needs the replica in a placement group of {self.ep_size} bundles "
                "(deployment option placement_group_bundles; cluster.ep.serve_options)"
            )
        address = ray.util.get_node_ip_address()
        port = free_port(address)
        specs = [
            RankSpec(str(self.model_dir), rank, self.ep_size, address, port, self.placement, dtype=self.dtype,
                     timeout_s=self.timeout_s, torch_threads=self.torch_threads)
            for rank in range(self.ep_size)
        ]
        actor = ray.remote(_RankActor)
        try:
            for spec in specs[1:]:
                strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=spec.rank)
                handle = actor.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, resources=self.resources,
                                       scheduling_strategy=strategy, max_restarts=0, max_concurrency=2).remote()
                self.actors.append(handle)
                self._runs.append(handle.serve.remote(spec))
            self.model, self.ep = start_rank(specs[0])
            self.pids = [os.getpid(), *ray.get([a.pid.remote() for a in self.actors], timeout=self.timeout_s)]
        except BaseException:
            self.close()
            raise
        self.ep.start_heartbeat()
        return self

    def health_error(self) -> str | None:
        """Why the group cannot serve (a rank's ``serve`` ended, the group broke), or None."""
        if self.ep is not None and self.ep.error is not None:
            return self.ep.error
        if self._runs:
            import ray

            done, _ = ray.wait(self._runs, num_returns=1, timeout=0)
            if done:
                rank = self._runs.index(done[0]) + 1
                try:
                    ray.get(done[0])
                    why = "returned"
                except Exception as e:  # the actor died, or its group broke
                    why = f"failed: {str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}"
                return f"expert-parallel rank {rank} {why}"
        return None

    def close(self) -> None:
        if self.ep is not None:
            self.ep.close()
        if self.actors:
            import ray

            ray.wait(self._runs, num_returns=len(self._runs), timeout=5.0)
            for handle in self.actors:
                ray.kill(handle)
