"""How the router reaches workers in cluster mode: ``router.dispatch.WorkerSet`` over Ray Serve handles.

Calls name their replica (``route_to``, see ``cluster.request_router``); worker stats come from the
``StatsBoard`` actor, which every replica reports to.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import ray
from ray.serve.handle import DeploymentHandle

from cluster.servers import STATS_BOARD
from kvstore.transfer import TransferError
from workers.engine.types import GenerateRequest, KVHandle, RequestOutput, WorkerStats

STATS_REFRESH_S = 0.25


class _PrefillClient:
    """``router.disagg.PrefillWorker`` over a Serve handle, pinned to the chosen replica (leases end
    by ``release``, by the transfer backend's notification, or at expiry)."""

    def __init__(self, handle: DeploymentHandle, route_to: str | None) -> None:
        self.handle, self.route_to = handle, route_to

    async def prefill(self, request: GenerateRequest, prefix: KVHandle | None = None) -> KVHandle:
        handle = await self.handle.prefill.remote(request, prefix, route_to=self.route_to)
        self.route_to = handle.worker_id  # release goes to the replica that holds the blocks
        return handle

    def release(self, request_id: str) -> None:
        self.handle.release.remote(request_id, route_to=self.route_to)  # fire and forget


class _DecodeClient:
    """``router.disagg.DecodeWorker`` over a streaming Serve handle."""

    def __init__(self, handle: DeploymentHandle, route_to: str | None = None) -> None:
        self.handle = handle.options(stream=True)
        self.route_to = route_to

    async def decode(self, request: GenerateRequest, handle: KVHandle, on_read) -> AsyncIterator[RequestOutput]:
        stream = self.handle.decode.remote(request, handle, route_to=self.route_to)
        try:
            first = await stream.__anext__()
            error = first.get("read") if isinstance(first, dict) else "decode stream did not start with a read result"
            on_read(None if error is None else TransferError(error))
            if error is not None:
                raise TransferError(error)
            async for out in stream:
                yield out
        finally:
            stream.cancel()  # a no-op once finished; aborts the replica's request otherwise

    async def generate(self, request: GenerateRequest, prefix: KVHandle | None = None) -> AsyncIterator[RequestOutput]:
        stream = self.handle.generate.remote(request, prefix, route_to=self.route_to)
        try:
            async for out in stream:
                yield out
        finally:
            stream.cancel()


class _HolderClient:
    """``router.disagg.PrefixHolder`` over a Serve handle, pinned to the worker holding the prefix."""

    def __init__(self, handle: DeploymentHandle, worker_id: str) -> None:
        self.handle, self.worker_id = handle, worker_id

    async def export(self, request_id: str, hashes: list[bytes], first_block: int) -> KVHandle | None:
        handle = await self.handle.export.remote(request_id, hashes, first_block, route_to=self.worker_id)
        if handle is not None and handle.worker_id != self.worker_id:
            # Serve sent the call for a vanished replica elsewhere: only the named holder's pull was planned.
            self.handle.release.remote(handle.request_id, route_to=handle.worker_id)
            return None
        return handle

    def release(self, lease_id: str) -> None:
        self.handle.release.remote(lease_id, route_to=self.worker_id)  # fire and forget


class RayWorkers:
    """``router.dispatch.WorkerSet`` over the prefill and decode deployments; worker stats come from
    the ``StatsBoard`` (refreshed at most every ``STATS_REFRESH_S``)."""

    mode = "cluster"
    retryable: tuple[type[BaseException], ...] = (ray.exceptions.RayError,)
    expects_prefill = True

    def __init__(self, prefill: DeploymentHandle, decode: DeploymentHandle) -> None:
        self._prefill, self._decode = prefill, decode
        self._workers: list[WorkerStats] = []
        self._workers_at = 0.0

    async def current(self) -> list[WorkerStats]:
        if time.monotonic() - self._workers_at > STATS_REFRESH_S:
            try:
                board = await ray.get_actor(STATS_BOARD).all.remote()
            except Exception:
                pass  # keep the last known stats
            else:
                self._workers = [WorkerStats.from_json(w) for w in board]
            self._workers_at = time.monotonic()
        return self._workers

    def snapshot(self) -> list[WorkerStats]:
        try:
            board = ray.get(ray.get_actor(STATS_BOARD).all.remote(), timeout=5)
        except Exception:  # the board is gone: report the router alone
            board = []
        return [WorkerStats.from_json(w) for w in board]

    def refresh(self) -> None:
        self._workers_at = 0.0

    def health_error(self) -> str | None:
        return None

    def prefill(self, worker_id: str) -> _PrefillClient:
        return _PrefillClient(self._prefill, worker_id)

    def decode(self, worker_id: str | None) -> _DecodeClient:
        return _DecodeClient(self._decode, worker_id)

    def holder(self, worker_id: str) -> _HolderClient:
        return _HolderClient(self._prefill if worker_id.startswith("prefill-") else self._decode, worker_id)
