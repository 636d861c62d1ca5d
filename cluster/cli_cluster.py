"""Cluster subcommands of the ``dsaserve`` CLI.

    dsaserve serve --config cluster.yaml [--address RAY_ADDRESS] [--dtype auto|float32|bfloat16]
    dsaserve status [--address HOST:PORT] [--json] [--tls-ca F [--tls-cert F --tls-key F]]
    dsaserve tls-front --listen HOST:PORT --upstream HOST:PORT --tls-cert F --tls-key F [--tls-client-ca F]

``serve`` starts a local Ray when neither ``--address`` nor ``RAY_ADDRESS`` names a cluster, runs
until interrupted, and shuts down cleanly; ``--dtype`` overrides the config's ``dtype``. With
``router.tls`` in the config it runs the TLS front on ``router.grpc_port`` itself. ``status`` works
against local mode and cluster mode. ``tls-front`` terminates TLS in front of a plaintext gRPC server
(the Helm chart runs it beside the Ray head).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from cluster.cli_args import positive_float
from cluster.cli_args import device_arg
from cluster.cli_serve import _user_errors
from cluster.cli_tls import add_client_tls_args, add_server_tls_args, client_tls, server_tls
from workers.engine.types import WorkerStats
from workers.model.device import DTYPE_CHOICES


def register(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the cluster (Ray Serve) described by a YAML config")
    serve.add_argument("--config", required=True, type=Path, help="cluster YAML (model, prefill, decode, transfer, router)")
    serve.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else start one)")
    serve.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                       help="weight dtype of the replicas, resolved on each one's machine (default: the config's)")
    serve.add_argument("--device", type=device_arg, default=None,
                       help="auto, cpu, cuda or cuda:N for every replica, resolved on each (default: the config's)")
    serve.set_defaults(func=cmd_serve)

    status = commands.add_parser("status", help="workers' load, KV blocks and KV transfer counters")
    status.add_argument("--address", default="127.0.0.1:50051", help="router HOST:PORT (default: 127.0.0.1:50051)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    add_client_tls_args(status)
    status.set_defaults(func=cmd_status)

    front = commands.add_parser("tls-front", help="terminate TLS in front of a plaintext gRPC server (e.g. Serve's proxy)")
    front.add_argument("--listen", required=True, help="HOST:PORT to serve TLS on (port 0 picks one)")
    front.add_argument("--upstream", required=True, help="HOST:PORT of the plaintext gRPC server")
    add_server_tls_args(front, required=True)
    front.add_argument("--grace", type=positive_float, default=5.0,
                       help="seconds calls in flight get when stopping (default: 5)")
    front.set_defaults(func=cmd_tls_front)


@_user_errors
def cmd_serve(args: argparse.Namespace) -> int:
    from cluster.config import ClusterConfigError, load_config

    try:
        config = load_config(args.config)
    except ClusterConfigError as e:
        raise OSError(str(e)) from None  # reported as one line, exit 2
    if args.dtype is not None:
        config = config.model_copy(update={"dtype": args.dtype})
    if args.device is not None:
        config = config.model_copy(update={"device": args.device})
    from cluster import app

    address = args.address or os.environ.get("RAY_ADDRESS") or None
    tls = config.router.tls
    if tls is not None:
        _check_tls_ports(config)
        tls.check()  # before Ray starts: a bad TLS file fails at once
    stop = threading.Event()
    handle = app.start(config, address=address)
    # After ray.init: Ray's core worker installs its own SIGTERM handler (which aborts the process).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    front = None
    try:
        ready = app.wait_ready(handle, config)
        if tls is not None:
            from router.tls_front import TLSFrontThread

            front = TLSFrontThread(f"{config.router.host}:{config.router.grpc_port}",
                                   f"127.0.0.1:{tls.upstream_port}", tls)
        print(
            f"dsaserve: cluster ready, gRPC on {config.router.host}:{config.router.grpc_port}{_tls_note(tls)}, "
            f"http on {config.router.host}:{config.router.http_port} ({len(ready['workers'])} workers, KV transfer {config.transfer}, dtype {config.dtype}; Ctrl-C stops)",
            flush=True,
        )
        stop.wait()
        print("dsaserve: shutting down", file=sys.stderr, flush=True)
    finally:
        if front is not None:
            front.stop()
        app.shutdown()
    return 0


def _check_tls_ports(config: Any) -> None:
    router = config.router
    if router.tls.upstream_port in (router.grpc_port, router.http_port):
        raise OSError(f"router.tls.upstream_port ({router.tls.upstream_port}) must differ from router.grpc_port "
                      f"({router.grpc_port}) and router.http_port ({router.http_port})")


def _tls_note(tls: Any) -> str:
    if tls is None:
        return ""
    mode = "mutual TLS" if tls.mutual else "TLS"
    return f" with {mode} (Serve's plaintext proxy on port {tls.upstream_port})"


@_user_errors
def cmd_status(args: argparse.Namespace) -> int:
    from router.client import Client

    with Client(args.address, timeout=args.timeout, **client_tls(args)) as client:
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


@_user_errors
def cmd_tls_front(args: argparse.Namespace) -> int:
    tls = server_tls(args)
    return asyncio.run(_run_front(args.listen, args.upstream, tls, args.grace))


async def _run_front(listen: str, upstream: str, tls: Any, grace: float) -> int:
    from router.tls_front import TLSFront

    front = await TLSFront.start(listen, upstream, tls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    host = listen.rsplit(":", 1)[0]
    mode = "mutual TLS" if tls.mutual else "TLS"
    print(f"dsaserve: {mode} on {host}:{front.port}, forwarding to {upstream}", flush=True)
    await stop.wait()
    print("dsaserve: shutting down", file=sys.stderr, flush=True)
    await front.stop(grace)
    return 0
