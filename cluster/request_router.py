"""A Ray Serve ``RequestRouter`` that sends a call to the replica the dsaserve router chose.

The cache-aware policy (``router/policy.py``) picks workers by id; a worker's id is its role plus
its Serve replica id, so this router only has to find that replica among the candidates. Calls
without a ``route_to`` keyword (or whose replica is gone) take the least-loaded of two random
candidates, as Serve's default does.
"""

from __future__ import annotations

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica

ROUTE_KWARG = "route_to"


def replica_part(worker_id: str) -> str:
    """``prefill-ab12cd34`` → ``ab12cd34`` (the Serve replica id)."""
    return worker_id.rsplit("-", 1)[-1]


class WorkerIdRequestRouter(PowerOfTwoChoicesRequestRouter):
    """Routes ``handle.method.remote(..., route_to=WORKER_ID)`` to that worker's replica."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get(ROUTE_KWARG) if pending_request is not None else None
        if target:
            want = replica_part(target)
            chosen = [r for r in candidate_replicas if r.replica_id.unique_id == want]
            if chosen:
                return [chosen]
        if not candidate_replicas:
            return []
        return await super().choose_replicas(candidate_replicas, pending_request)
