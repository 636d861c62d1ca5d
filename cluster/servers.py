"""Ray Serve deployments wrapping the plain worker classes: prefill, decode, and a stats board.

Each replica owns one Engine on its own EngineLoop thread. Replicas publish their stats to a named
``StatsBoard`` actor so the router can report every worker (Serve handles reach *a* replica, not all).

Every replica both holds and reads KV through the transfer backend: prefill hands its prompts' blocks to
decode, decode reads them, and either may export a prefix it holds to a peer that pulls it
(``workers.engine.peer``) — a decode replica's blocks include what its answers filled, which a
conversation's next turn reuses. A NIXL replica so has two agents: its holder, named by the worker id on
prefill (``<id>-holder`` on decode), and its reader, named by the worker id on decode (``<id>-reader``
on prefill).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import ray
from ray import serve

from kvstore.disk_slot import claim_disk_slot
from kvstore.index import volume_worker_id
from kvstore.publisher import IndexPublisher
from kvstore.redis_index import RedisKVIndex
from kvstore.transfer import TransferError
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.types import GenerateRequest, KVHandle, RequestOutput, WorkerError, WorkerStats
from workers.model.checkpoint import load_model
from workers.model.device import dtype_name, resolve_device, resolve_dtype
from workers.host import prepare_serving_process
from workers.worker import EngineLoop, EngineWorker

STATS_BOARD = "dsaserve-stats"
STATS_PERIOD_S = 0.5


@ray.remote(num_cpus=0)
class StatsBoard:
    """Latest stats of every worker, keyed by worker id; entries older than ``ttl_s`` are dropped.

    Entries are ``WorkerStats.to_json()`` dicts (readers use ``WorkerStats.from_json``): the board is
    detached and can outlive a deployment, so what it holds must not depend on the dataclass being the
    same in the processes that report and read.
    """

    def __init__(self, ttl_s: float = 10.0) -> None:
        self.ttl_s = ttl_s
        self._stats: dict[str, tuple[float, dict]] = {}

    def report(self, worker_id: str, stats: dict) -> None:
        self._stats[worker_id] = (time.time(), stats)

    def remove(self, worker_id: str) -> None:
        self._stats.pop(worker_id, None)

    def all(self) -> list[dict]:
        now = time.time()
        return [s for t, s in sorted(self._stats.values(), key=lambda x: x[1]["id"]) if now - t < self.ttl_s]


def _replica_id(role: str) -> str:
    try:
        return f"{role}-{serve.get_replica_context().replica_id.unique_id}"
    except Exception:  # outside Serve (tests building the class directly)
        return f"{role}-{uuid.uuid4().hex[:8]}"


class _EngineServer:
    """Common part of prefill and decode replicas: model, engine, loop, stats publishing."""

    role = "both"

    def __init__(self, model_dir: str, engine_config: EngineConfig, transfer: str, torch_threads: int = 1,
                 transfer_timeout_s: float = 30.0, index: dict | None = None, ep: dict | None = None,
                 dtype: str = "float32", device: str = "cpu", fp8_weights: str = "resident") -> None:
        """``ep``: ``{"ep_size", "timeout_s", "num_cpus", "num_gpus", "resources"}`` when a replica spans
        expert-parallel ranks (``cluster.ep.RayEPGroup``); None or ep_size 1: one process.
        ``dtype``/``device``: ``ClusterConfig.dtype``/``device``, resolved here, on the machine the replica
        runs on (Ray makes the GPU it assigned the replica this process's ``cuda:0``)."""
        engine_threads = prepare_serving_process(torch_threads)  # this thread keeps one (workers.host)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.ep_group = None
        self.worker_id = _replica_id(self.role)
        self.disk_slot = None
        if engine_config.disk_cache_dir:  # <dir>/<role>-<n>: a restarted replica reuses a dead one's blocks
            self.disk_slot = claim_disk_slot(engine_config.disk_cache_dir, self.role)
            engine_config = dataclasses.replace(engine_config, disk_cache_dir=str(self.disk_slot.path))
        model_id = Path(model_dir).name
        self.publisher = self.volume_publisher = None
        events = {}
        make_index = None
        if index and index.get("url"):
            def make_index() -> RedisKVIndex:
                return RedisKVIndex(os.path.expandvars(index["url"]), model_id, engine_config.block_size,
                                    **index.get("options", {}))

            self.publisher = IndexPublisher(make_index, self.worker_id, self.role, lambda: self.engine.block_snapshot(),
                                            ttl_s=index.get("ttl_s", 10.0))
            events = {"on_block_event": self.publisher.on_block_event, "on_tier_event": self.publisher.on_tier_event,
                      "on_shared_event": self._on_shared_event}
        if ep and ep.get("ep_size", 1) > 1:
            from cluster.ep import RayEPGroup

            self.ep_group = RayEPGroup(model_dir, ep["ep_size"], num_cpus=ep["num_cpus"], num_gpus=ep["num_gpus"],
                                       resources=ep.get("resources"), timeout_s=ep["timeout_s"],
                                       dtype=dtype_name(self.dtype), torch_threads=torch_threads).start()
            model = self.ep_group.model
        else:
            model = load_model(model_dir, dtype=self.dtype, device=self.device, fp8_weights=fp8_weights)
        self.engine = Engine(model, engine_config, role=self.role, worker_id=self.worker_id, model_id=model_id,
                             **events, **self._transfer_args(transfer, transfer_timeout_s))
        if self.publisher is not None:
            self.publisher.start()
        shared = self.engine.kv.shared_disk
        if shared is not None and make_index is not None:
            # The shared folder has its own index entry, which every replica mounting it keeps up.
            self.volume_publisher = IndexPublisher(
                make_index, volume_worker_id(shared.volume_id), "volume", lambda: {"disk": shared.hashes()},
                ttl_s=index.get("ttl_s", 10.0), shared=True).start()
        self.loop = EngineLoop([self.engine], name=self.worker_id, num_threads=engine_threads).start()
        self.worker = EngineWorker(self.engine)
        self._board = ray.get_actor(STATS_BOARD)
        self._stop = threading.Event()
        threading.Thread(target=self._publish, daemon=True, name=f"{self.worker_id}-stats").start()

    def _on_shared_event(self, kind: str, block_hash: bytes) -> None:
        if self.volume_publisher is not None:  # before it starts, its first snapshot covers the block
            self.volume_publisher.on_tier_event(kind, "disk", block_hash)

    def _transfer_args(self, transfer: str, timeout_s: float) -> dict:
        """The engine's holder factory and reader (``transfer``) for this backend."""
        holder_name, reader_name = self._agent_names()
        if transfer == "nixl":
            from kvstore.nixl_transfer import NixlHolder, NixlTransfer

            self.transfer = NixlTransfer(reader_name, timeout_s=timeout_s)
            return {"transfer": self.transfer, "holder_factory": lambda storage: NixlHolder(holder_name, storage)}
        if transfer == "ray":
            from cluster.ray_transfer import RayHolder, RayTransfer

            self.transfer = RayTransfer(timeout_s=timeout_s)
            return {"transfer": self.transfer, "holder_factory": RayHolder}
        raise ValueError(f"transfer {transfer!r} cannot cross processes; use nixl or ray")

    def _agent_names(self) -> tuple[str, str]:
        return f"{self.worker_id}-holder", f"{self.worker_id}-reader"

    async def export(self, request_id: str, hashes: list[bytes], first_block: int,
                     route_to: str | None = None) -> KVHandle | None:
        """Lease the longest prefix of ``hashes`` held here for a peer (None: none of it is held)."""
        return await self.worker.export(request_id, hashes, first_block)

    def release(self, request_id: str, route_to: str | None = None) -> None:
        """End a lease early: a hand-off's (by request id) or an export's (by its lease id)."""
        self.worker.release(request_id)

    def stats(self) -> WorkerStats:
        ep = None if self.ep_group is None or self.ep_group.ep is None else {
            **self.ep_group.ep.stats(load=False), "pids": self.ep_group.pids}
        return dataclasses.replace(self.engine.stats(), healthy=self._health_error() is None,
                                   indexed=None if self.publisher is None else self.publisher.healthy, ep=ep)

    def _health_error(self) -> str | None:
        error = self.loop.health_error()
        if error is not None:
            return error
        return None if self.ep_group is None else self.ep_group.health_error()

    def _publish(self) -> None:
        while not self._stop.wait(STATS_PERIOD_S):
            try:
                self._board.report.remote(self.worker_id, self.stats().to_json())
            except Exception:  # the board restarting must not kill the replica
                pass

    def check_health(self) -> None:
        """Serve's health check: a crashed engine loop, or a dead expert-parallel rank, marks the
        replica unhealthy (it is replaced, its placement group and rank actors with it)."""
        error = self._health_error()
        if error is not None:
            raise RuntimeError(error)

    def __del__(self) -> None:
        if not hasattr(self, "_stop"):  # __init__ failed before the loop started: nothing to stop
            return
        self._stop.set()
        self.loop.stop(timeout=1.0)
        for publisher in (self.publisher, self.volume_publisher):
            if publisher is not None:
                publisher.stop()


class PrefillServer(_EngineServer):
    """Runs prompts; returns leased KV handles whose blocks the decode side reads."""

    role = "prefill"

    def _agent_names(self) -> tuple[str, str]:
        return self.worker_id, f"{self.worker_id}-reader"

    async def prefill(self, request: GenerateRequest, prefix: KVHandle | None = None,
                      route_to: str | None = None) -> KVHandle:
        return await self.worker.prefill(request, prefix)


class DecodeServer(_EngineServer):
    """Reads KV handles and decodes in continuous batches; can also run whole requests (fallback)."""

    role = "decode"

    def _agent_names(self) -> tuple[str, str]:
        return f"{self.worker_id}-holder", self.worker_id

    async def decode(self, request: GenerateRequest, handle: KVHandle, route_to: str | None = None) -> AsyncIterator[dict | RequestOutput]:
        """Stream: first ``{"read": None}`` or ``{"read": "error text"}``, then the outputs.

        (Exceptions crossing a Serve stream arrive wrapped; a typed first item is unambiguous.)
        """
        async with aclosing(self.worker.decode(request, handle, lambda _err: None)) as stream:
            try:
                first = await stream.__anext__()
            except TransferError as e:
                yield {"read": str(e)}
                return
            yield {"read": None}
            yield first
            async for out in stream:
                yield out

    async def generate(self, request: GenerateRequest, prefix: KVHandle | None = None,
                       route_to: str | None = None) -> AsyncIterator[RequestOutput]:
        async with aclosing(self.worker.generate(request, prefix)) as stream:
            async for out in stream:
                yield out


def ensure_stats_board() -> None:
    """Create the named, detached stats board once per cluster namespace."""
    try:
        ray.get_actor(STATS_BOARD)
    except ValueError:
        StatsBoard.options(name=STATS_BOARD, lifetime="detached", get_if_exists=True).remote()


__all__ = ["DecodeServer", "PrefillServer", "StatsBoard", "WorkerError", "ensure_stats_board"]
