"""Cluster subcommands of the ``dsaserve`` CLI.

    dsaserve serve --config cluster.yaml [--address RAY_ADDRESS] [--dtype auto|float32|bfloat16]
    dsaserve status [--address HOST:PORT] [--json]

``serve`` starts a local Ray when neither ``--address`` nor ``RAY_ADDRESS`` names a cluster, runs
until interrupted, and shuts down cleanly; ``--dtype`` overrides the config's ``dtype``. ``status``
works against local mode and cluster mode.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from cluster.cli_serve import _user_errors
from workers.engine.types import WorkerStats
from workers.model.device import DTYPE_CHOICES


def register(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the cluster (Ray Serve) described by a YAML config")
    serve.add_argument("--config", required=True, type=Path, help="cluster YAML (model, prefill, decode, transfer, router)")
    serve.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else start one)")
    serve.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                       help="weight dtype of the replicas, resolved on each one's machine (default: the config's)")
    serve.set_defaults(func=cmd_serve)

    status = commands.add_parser("status", help="workers' load, KV blocks and KV transfer counters")
    status.add_argument("--address", default="127.0.0.1:50051", help="router HOST:PORT (default: 127.0.0.1:50051)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    status.set_defaults(func=cmd_status)


@_user_errors
def cmd_serve(args: argparse.Namespace) -> int:
    from cluster.config import ClusterConfigError, load_config

    try:
        config = load_config(args.config)
    except ClusterConfigError as e:
        raise OSError(str(e)) from None  # reported as one line, exit 2
    if args.dtype is not None:
        config = config.model_copy(update={"dtype": args.dtype})
    from cluster import app

    address = args.address or os.environ.get("RAY_ADDRESS") or None
    stop = threading.Event()
    handle = app.start(config, address=address)
    # After ray.init: Ray's core worker installs its own SIGTERM handler (which aborts the process).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        ready = app.wait_ready(handle, config)
        print(
            f"dsaserve: cluster ready, gRPC on {config.router.host}:{config.router.grpc_port} "
            f"({len(ready['workers'])} workers, KV transfer {config.transfer}, dtype {config.dtype}; Ctrl-C stops)",
            flush=True,
        )
        stop.wait()
        print("dsaserve: shutting down", file=sys.stderr, flush=True)
    finally:
        app.shutdown()
    return 0


@_user_errors
def cmd_status(args: argparse.Namespace) -> int:
    from router.client import Client

    with Client(args.address, timeout=args.timeout) as client:
        status = client.status()
    if args.json:
        print(json.dumps(status))
        return 0
    router = status["router"]
    print(f"mode {status['mode']}  requests {router['requests_total']}  in flight {router['in_flight']}"
          f"  errors {router['errors_total']}")
    print(f"{'worker':<22} {'role':<8} {'requests':>8} {'running':>7} {'free/total blocks':>18} {'kv backend':>10} {'kv bytes':>12}")
    for w in map(WorkerStats.from_json, status["workers"]):
        print(f"{w.worker_id:<22} {w.role:<8} {w.requests_total:>8} {w.running:>7} "
              f"{w.free_blocks:>9}/{w.total_blocks:<8} {w.kv_transfer.backend:>10} {w.kv_transfer.bytes:>12}")
    return 0
