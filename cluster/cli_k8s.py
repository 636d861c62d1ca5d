"""Kubernetes subcommands of the ``dsaserve`` CLI (``cluster/k8s.py`` does the work).

    dsaserve k8s status [--namespace NS] [--name RAYSERVICE] [--router HOST:PORT] [--context CTX] [--json]
    dsaserve k8s plan --router HOST:PORT [--name RAYSERVICE] [--namespace NS] [--prefill-replicas MIN:MAX]
                      [--decode-replicas MIN:MAX] [--target-ttft-ms MS] [--cooldown-s S]
                      [--scale-down-cooldown-s S] [--max-total-gpus N] [--interval-s S] [--once] [--dry-run]

Credentials: the pod's ServiceAccount inside a cluster (the chart's planner Deployment), else the
kubeconfig. Errors a user can fix exit with status 2 and one line.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any
from cluster.cli_args import non_negative_float, positive_float


def register(commands: Any) -> None:
    k8s = commands.add_parser("k8s", help="the Kubernetes deployment: status, and the replica planner")
    sub = k8s.add_subparsers(dest="k8s_command", required=True, metavar="ACTION")

    status = sub.add_parser("status", help="RayService, Serve applications and pods at a glance")
    _add_target_args(status)
    status.add_argument("--router", default=None, help="also show the router's load (HOST:PORT of its gRPC Service)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=cmd_status)

    plan = sub.add_parser("plan", help="resize prefill and decode from the router's metrics (runs until stopped)")
    _add_target_args(plan)
    plan.add_argument("--router", required=True, help="HOST:PORT of the router's gRPC Service")
    plan.add_argument("--prefill-replicas", type=_bounds, default="1:4", metavar="MIN:MAX", help="(default: 1:4)")
    plan.add_argument("--decode-replicas", type=_bounds, default="1:4", metavar="MIN:MAX", help="(default: 1:4)")
    plan.add_argument("--target-ttft-ms", type=positive_float, default=2000.0, help="time-to-first-token target (default: 2000)")
    plan.add_argument("--cooldown-s", type=non_negative_float, default=120.0, help="after a change, before growing again")
    plan.add_argument("--scale-down-cooldown-s", type=non_negative_float, default=600.0, help="after a change, before shrinking")
    plan.add_argument("--max-total-gpus", type=int, default=None, help="GPU budget of prefill + decode together")
    plan.add_argument("--interval-s", type=positive_float, default=15.0, help="seconds between observations (default: 15)")
    plan.add_argument("--no-probe", action="store_true", help="no TTFT probe request (queue and load signals only)")
    plan.add_argument("--once", action="store_true", help="one observation and decision, then exit")
    plan.add_argument("--dry-run", action="store_true", help="decide and print, never patch")
    plan.set_defaults(func=cmd_plan)


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--namespace", "-n", default=None, help="(default: the pod's, else the kubeconfig context's)")
    p.add_argument("--name", default=None, help="the RayService (default: the only dsaserve one in the namespace)")
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument("--app", default=None, help="Serve application name (default: the one running cluster.app)")


def _bounds(text: str):
    from cluster.k8s_planner import Bounds

    try:
        low, high = (int(x) for x in text.split(":"))
        return Bounds(low, high)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 1 <= MIN <= MAX, got {text!r} ({e})") from None


def _k8s_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        from cluster.k8s import K8sError
        from cluster.k8s_planner import PlanError
        from router.client import DsaServeError

        try:
            return func(args)
        except (K8sError, PlanError, DsaServeError) as e:
            print(f"dsaserve: error: {e}", file=sys.stderr)
            return 2

    return wrapper


def _connect(args: argparse.Namespace):
    from cluster.k8s import Kube, default_namespace, find_rayservice

    kube = Kube.connect(args.context)
    namespace = args.namespace or default_namespace(args.context)
    return kube, namespace, find_rayservice(kube, namespace, args.name)


@_k8s_errors
def cmd_status(args: argparse.Namespace) -> int:
    from cluster.k8s import format_status, pod_selector, summarize

    kube, namespace, rayservice = _connect(args)
    pods = kube.list_pods(namespace, pod_selector(rayservice))
    router = None
    if args.router:
        from router.client import Client

        with Client(args.router, timeout=10.0) as client:
            router = client.status()
    summary = summarize(rayservice, pods, router)
    print(json.dumps(summary) if args.json else format_status(summary))
    return 0


@_k8s_errors
def cmd_plan(args: argparse.Namespace) -> int:
    from cluster.k8s import Planner, router_metrics
    from cluster.k8s_planner import PlannerConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    kube, namespace, rayservice = _connect(args)
    config = PlannerConfig(
        prefill=args.prefill_replicas, decode=args.decode_replicas, target_ttft_ms=args.target_ttft_ms,
        cooldown_s=args.cooldown_s, scale_down_cooldown_s=args.scale_down_cooldown_s, max_total_gpus=args.max_total_gpus,
    )
    planner = Planner(kube, namespace, rayservice["metadata"]["name"], config,
                      router_metrics(args.router, probe=not args.no_probe), app_name=args.app, dry_run=args.dry_run)
    if args.once:
        step = planner.step()
        print(json.dumps({"prefill": step.decision.prefill, "decode": step.decision.decode,
                          "reasons": list(step.decision.reasons), "patched": step.patched}))
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    planner.run(args.interval_s, stop)
    return 0
