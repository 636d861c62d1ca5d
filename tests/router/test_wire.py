"""Status through the wire: a backend's typed stats → ``StatusResponse`` → the JSON ``dsaserve status
--json`` prints, with the CLI contract's keys and values."""

from __future__ import annotations

from router import wire
from tests.engine.test_stats import FULL, KV_TRANSFER_KEYS, WORKER_KEYS


def test_status_json_after_the_wire_is_the_workers_json():
    status = {"mode": "cluster", "router": {"requests_total": 9, "in_flight": 2, "errors_total": 1, "routes": {}},
              "workers": [FULL]}
    out = wire.status_from_proto(wire.status_to_proto(status))
    assert out["mode"] == "cluster" and out["router"] == {"requests_total": 9, "in_flight": 2, "errors_total": 1}
    (w,) = out["workers"]
    assert set(w) == WORKER_KEYS | {"context_cache_hits", "peer_pulls", "disk_volume"}
    assert set(w["kv_transfer"]) == KV_TRANSFER_KEYS
    # The message carries neither the EP block, the read timing nor the step size (the router reads
    # those from the workers directly); everything else arrives as sent.
    want = FULL.to_json()
    del want["ep"], want["kv_transfer"]["seconds"], want["step_tokens"]
    assert w == want
