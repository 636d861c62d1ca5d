"""PendingRoutes: the blocks this router has just sent to a worker, before the KV index shows them.

Workers publish their blocks to the index in periodic batches, and only once a prefill has computed
them; until then the index says a fresh prefix lives nowhere, and a second request with the same prefix
(back to back, or concurrent with the first) would be routed as a miss and computed again elsewhere
(Dynamo's router counts the blocks of requests it just routed for the same reason). So the router
records a routed prompt's block hashes as *pending* on the chosen worker: held for as long as the
request is in flight, then for ``ttl_s`` more — time enough for the worker's index events to arrive.
A lookup takes, per worker, the longest prefix covered by the index's match or pending blocks.

Bounded: at most ``max_blocks`` entries in all; the oldest give way first (a forgotten entry only
costs a cache hit). Not thread-safe: one router event loop owns it. The clock is injectable for tests.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence

from kvstore.hashing import BlockHash

IN_FLIGHT = float("inf")


class PendingRoutes:
    """Per worker: block hash → expiry (``IN_FLIGHT`` while a request routed there holds it)."""

    def __init__(self, ttl_s: float = 10.0, *, max_blocks: int = 1_000_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s < 0:
            raise ValueError(f"ttl_s must be ≥ 0, got {ttl_s}")
        self.ttl_s, self.max_blocks, self._clock = ttl_s, max_blocks, clock
        self._blocks: OrderedDict[tuple[str, BlockHash], float] = OrderedDict()  # oldest record first
        self._refs: dict[tuple[str, BlockHash], int] = {}  # requests in flight holding the entry
        self._expiring: deque[tuple[float, tuple[str, BlockHash]]] = deque()  # in expiry order
        self._requests: dict[str, list[tuple[str, BlockHash]]] = {}
        self._by_worker: dict[str, set[BlockHash]] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def record(self, request_id: str, worker_id: str, hashes: Sequence[BlockHash]) -> None:
        """``request_id`` was routed to ``worker_id``, which will hold ``hashes`` once it has run."""
        held = self._by_worker.setdefault(worker_id, set())
        keys = self._requests.setdefault(request_id, [])
        for h in hashes:
            key = (worker_id, h)
            self._blocks[key] = IN_FLIGHT
            self._blocks.move_to_end(key)
            self._refs[key] = self._refs.get(key, 0) + 1
            held.add(h)
            keys.append(key)
        while len(self._blocks) > self.max_blocks:
            self._drop(next(iter(self._blocks)))

    def finish(self, request_id: str) -> None:
        """The request's prefill is over (or it failed): its blocks stay pending ``ttl_s`` more
        (unless another request in flight holds them too)."""
        expires = self._clock() + self.ttl_s
        for key in self._requests.pop(request_id, ()):
            refs = self._refs.get(key, 0) - 1
            if refs > 0:
                self._refs[key] = refs
                continue
            self._refs.pop(key, None)
            if key in self._blocks:
                self._blocks[key] = expires
                self._expiring.append((expires, key))

    def forget_worker(self, worker_id: str) -> None:
        """The worker is gone: nothing is pending on it any more."""
        for h in list(self._by_worker.get(worker_id, ())):
            self._drop((worker_id, h))

    def _drop(self, key: tuple[str, BlockHash]) -> None:
        self._blocks.pop(key, None)
        self._by_worker[key[0]].discard(key[1])

    def _expire(self) -> None:
        now = self._clock()
        while self._expiring and self._expiring[0][0] <= now:
            expires, key = self._expiring.popleft()
            if self._blocks.get(key) == expires:  # not recorded again since
                self._drop(key)

    def extend(self, hashes: Sequence[BlockHash], matched: dict[str, int], workers: Iterable[str]) -> dict[str, int]:
        """For each of ``workers``: the longest prefix of ``hashes`` held by the index (its ``matched``
        count) or pending there."""
        self._expire()
        out = {}
        for w in workers:
            n = matched.get(w, 0)
            pending = self._by_worker.get(w)
            if pending:
                while n < len(hashes) and hashes[n] in pending:
                    n += 1
            out[w] = n
        return out
