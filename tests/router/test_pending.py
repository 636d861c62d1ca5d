"""PendingRoutes: the router counts the blocks it just routed to a worker as held there, while the
request is in flight and ``ttl_s`` after, so a prefix sent again before the KV index shows it lands on
the same worker."""

from __future__ import annotations

import pytest

from router.pending import PendingRoutes

H = [bytes([i]) * 32 for i in range(6)]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_blocks_are_pending_while_in_flight_and_ttl_after():
    clock = Clock()
    p = PendingRoutes(ttl_s=5.0, clock=clock)
    p.record("r1", "w0", H[:4])
    assert p.extend(H, {}, ["w0", "w1"]) == {"w0": 4, "w1": 0}
    clock.t += 1000  # in flight: no expiry
    assert p.extend(H, {}, ["w0"]) == {"w0": 4}
    p.finish("r1")
    clock.t += 4.9
    assert p.extend(H, {}, ["w0"]) == {"w0": 4}
    clock.t += 0.2
    assert p.extend(H, {}, ["w0"]) == {"w0": 0} and len(p) == 0


def test_pending_extends_the_index_match_and_never_shortens_it():
    p = PendingRoutes()
    p.record("r1", "w0", H[2:5])  # only blocks 2..4: a prefix must be contiguous from block 0
    assert p.extend(H, {"w0": 0}, ["w0"]) == {"w0": 0}
    assert p.extend(H, {"w0": 2}, ["w0"]) == {"w0": 5}
    assert p.extend(H, {"w0": 6}, ["w0"]) == {"w0": 6}


def test_a_block_another_request_still_holds_stays_in_flight():
    clock = Clock()
    p = PendingRoutes(ttl_s=1.0, clock=clock)
    p.record("r1", "w0", H[:3])
    p.record("r2", "w0", H[:3])
    p.finish("r1")
    clock.t += 10
    assert p.extend(H, {}, ["w0"]) == {"w0": 3}
    p.finish("r2")
    clock.t += 1.5
    assert p.extend(H, {}, ["w0"]) == {"w0": 0}


def test_bounded_oldest_first_and_workers_forgotten():
    p = PendingRoutes(max_blocks=4)
    p.record("r1", "w0", H[:3])
    p.record("r2", "w1", H[:3])
    assert len(p) == 4 and p.extend(H, {}, ["w0", "w1"]) == {"w0": 0, "w1": 3}  # w0's first two gave way
    p.forget_worker("w1")
    assert p.extend(H, {}, ["w1"]) == {"w1": 0}
    with pytest.raises(ValueError, match="ttl_s"):
        PendingRoutes(ttl_s=-1)
