"""Serving subcommands of the ``dsaserve`` CLI (``register`` adds them to its argparse tree).

    dsaserve local [--model DIR] [--dtype auto|float32|bfloat16] [--host 127.0.0.1] [--port 50051]
                   [--http-host HOST] [--http-port 8000 | --no-http] [--tls-cert F --tls-key F [--tls-client-ca F]]
    dsaserve generate [--model DIR] [--dtype ...] (--prompt TEXT | --prompt-ids 1,2,3) [--max-tokens N] [sampling]
                      [--json] [--ep-size N]
    dsaserve client generate [--address HOST:PORT] (--prompt ... | --prompt-ids ...) [sampling] [--json]
                             [--tls-ca F [--tls-cert F --tls-key F] [--tls-server-name NAME]]
    dsaserve client health [--address HOST:PORT] [--service NAME] [TLS flags]   (exit 0: SERVING)
    dsaserve batch [--model DIR] [--dtype ...] --input prompts.jsonl --output results.jsonl [--concurrency N]

``generate`` runs in process and ``client generate`` through a server; both print the same JSON
(``Completion.to_json``). Without ``--model`` the embedded tiny model is used. Errors a user can fix
exit with status 2 and one line. ``--dtype auto`` (the default) loads the weights in bfloat16 where this
machine computes it natively, else in float32 (``workers.model.device``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.cli_args import device_arg, id_list, port, positive_int
from cluster.cli_tls import add_client_tls_args, add_server_tls_args, client_tls, server_tls
from router.backend import AdmissionError, BackendUnavailable
from workers.engine.types import RequestError
from workers.model.config import ConfigError
from workers.model.device import DTYPE_CHOICES
from workers.model.shards import CheckpointError


def register(commands: Any) -> None:
    """Add ``local``, ``generate``, ``client`` and ``batch`` to an ``add_subparsers()`` object."""
    local = commands.add_parser(
        "local", help="serve the gRPC and OpenAI-compatible HTTP APIs from one process (no Ray, no Redis)")
    _add_model_arg(local)
    local.add_argument("--host", default="127.0.0.1")
    local.add_argument("--port", type=port, default=50051, help="gRPC port; 0 picks a free port (default: 50051)")
    local.add_argument("--http-host", default=None, help="HTTP (OpenAI API) host (default: --host)")
    local.add_argument("--http-port", type=port, default=None,
                       help="HTTP (OpenAI API) port; 0 picks a free port (default: 8000, or a free port when "
                            "--port is 0)")
    local.add_argument("--no-http", action="store_true", help="serve gRPC only")
    local.add_argument("--max-queue", type=positive_int, default=None,
                       help="requests in flight before RESOURCE_EXHAUSTED (default: 1024)")
    local.add_argument("--limit", action="append", default=[], metavar="NAME=N",
                       help="a request limit (repeatable), e.g. max_stop_strings=8; ListModels reports them all")
    local.add_argument("--jobs-store", default=None, metavar="PATH|URL",
                       help="where batch jobs live: a SQLite file, or redis://... (default: jobs.sqlite3 in the "
                            "cache folder, $DSASERVE_CACHE)")
    local.add_argument("--no-jobs", action="store_true", help="serve no batch jobs (no /v1/files, /v1/batches, BatchJobs)")
    local.add_argument("--job-limit", action="append", default=[], metavar="NAME=N",
                       help="a batch job limit (repeatable): max_lines_per_job, max_file_bytes, max_jobs_in_flight, "
                            "max_line_chars, retention_s, concurrency, priority")
    add_server_tls_args(local)
    local.set_defaults(func=cmd_local)

    generate = commands.add_parser("generate", help="run one request offline, in process")
    _add_model_arg(generate)
    _add_request_args(generate)
    generate.add_argument("--ep-size", type=positive_int, default=1,
                          help="expert parallelism: N local processes share the routed experts (default: 1)")
    generate.set_defaults(func=cmd_generate)

    client = commands.add_parser("client", help="call a running server")
    client_sub = client.add_subparsers(dest="client_command", required=True, metavar="ACTION")
    client_generate = client_sub.add_parser("generate", help="run one request on a server")
    client_generate.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT (default: 127.0.0.1:50051)")
    client_generate.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    _add_request_args(client_generate)
    add_client_tls_args(client_generate)
    client_generate.set_defaults(func=cmd_client_generate)
    client_health = client_sub.add_parser(
        "health", help="ask grpc.health.v1 (no API key needed); exit 0 when SERVING, 1 otherwise")
    client_health.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT (default: 127.0.0.1:50051)")
    client_health.add_argument("--service", default="", help="service name (default: '', the whole server)")
    client_health.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds (default: 5)")
    add_client_tls_args(client_health)
    client_health.set_defaults(func=cmd_client_health)

    batch = commands.add_parser(
        "batch", help="run a JSONL file of requests offline, or as a durable job on a server (--address); resumable")
    _add_model_arg(batch)
    batch.add_argument("--address", default=None, metavar="HOST:PORT",
                       help="submit to this server as a batch job and follow it (instead of running in process)")
    batch.add_argument("--wait", type=float, default=600.0,
                       help="with --address: seconds to wait for an unreachable server before giving up (default: 600)")
    add_client_tls_args(batch)
    batch.add_argument("--input", type=Path, required=True, help="JSONL: one request object per line")
    batch.add_argument("--output", type=Path, required=True, help="JSONL results, appended; reruns skip done ids")
    batch.add_argument("--concurrency", type=positive_int, default=16, help="requests in flight (default: 16)")
    batch.set_defaults(func=cmd_batch)


def _user_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report the errors a user can fix as one line and exit status 2."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        from router.client import DsaServeError

        try:
            return func(args)
        except (RequestError, DsaServeError, AdmissionError, BackendUnavailable) as e:
            message = str(e)
        except (CheckpointError, ConfigError, OSError) as e:
            message = str(e) or type(e).__name__
        print(f"dsaserve: error: {message}", file=sys.stderr)
        return 2

    return wrapper


@_user_errors
def cmd_local(args: argparse.Namespace) -> int:
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    from cluster.local import LocalBackend
    from router.server import server_port, start_server
    from router.tokenizer import Tokenizer
    from workers.model.device import dtype_name

    from router.limits import RequestLimits

    try:
        limits = RequestLimits.from_pairs(args.limit)
    except ValueError as e:
        raise RequestError("limit", str(e)) from None
    engine_config = _engine_config(args, **({"max_queue": args.max_queue} if args.max_queue else {}))
    tls = server_tls(args)  # before the model loads: a bad TLS file fails at once
    dtype = _dtype(args)
    if args.no_http and args.http_port is not None:
        raise RequestError("http_port", "--http-port and --no-http exclude each other")
    job_limits = _job_limits(args.job_limit)
    with LocalBackend.start(args.model, dtype=dtype, device=_device(args), num_threads=_engine_threads(),
                            engine_config=engine_config, limits=limits, fp8_weights=args.fp8_weights) as backend:
        tokenizer = Tokenizer.load(backend.model_dir)
        jobs = None if args.no_jobs else _job_service(args, backend, tokenizer, job_limits)
        server = await start_server(backend, tokenizer, args.host, args.port, tls=tls, jobs=jobs)
        try:
            http = None if args.no_http else await _start_http(args, backend, tokenizer, tls, jobs)
        except BaseException:
            await server.stop(grace=0)
            raise
        if jobs is not None:
            jobs.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        info = backend.info()
        http_note = "" if http is None else f", http on {args.http_host or args.host}:{http.port}"
        print(
            f"dsaserve: ready on {args.host}:{server_port(server)}{_tls_note(tls)} (gRPC){http_note} "
            f"(model {info.model_id} in {dtype_name(dtype)} on {backend.device}, "
            f"{'text and token ids' if tokenizer else 'token ids only'}; Ctrl-C stops)",
            flush=True,
        )
        await stop.wait()
        print("dsaserve: shutting down", file=sys.stderr, flush=True)
        await asyncio.gather(server.stop(grace=5.0), *([http.stop(grace=5.0)] if http else []))
        if jobs is not None:
            await jobs.close()
    return 0


def _job_limits(pairs: list[str]) -> Any:
    """``JobLimits`` from NAME=N pairs; RequestError("job_limit") names a bad one."""
    from pydantic import ValidationError

    from router.jobs.types import JobLimits

    values: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise RequestError("job_limit", f"expected NAME=N, got {pair!r}")
        values[name.strip()] = value.strip()
    try:
        return JobLimits(**values)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RequestError("job_limit", f"{where}: {first['msg']}") from None


def _job_service(args: argparse.Namespace, backend: Any, tokenizer: Any, limits: Any) -> Any:
    """The batch jobs of this server, in ``--jobs-store`` (jobs left unfinished there resume)."""
    from cluster.local import cache_dir
    from router.frontend import Frontend
    from router.jobs.service import JobService
    from router.jobs.store import open_store

    store = open_store(args.jobs_store or str(cache_dir() / "jobs.sqlite3"))
    return JobService(store, Frontend(backend, tokenizer), limits)


async def _start_http(args: argparse.Namespace, backend: Any, tokenizer: Any, tls: Any, jobs: Any = None) -> Any:
    """The OpenAI-compatible HTTP server beside the gRPC one, on the same loop, backend and TLS files.
    Without --http-port: 8000, or a free port when --port is 0 (two test servers never collide)."""
    from router.frontend import Frontend
    from router.http import build_app, start_http_server

    http_port = args.http_port if args.http_port is not None else (0 if args.port == 0 else 8000)
    app = build_app(Frontend(backend, tokenizer), jobs=jobs)
    return await start_http_server(app, args.http_host or args.host, http_port, tls=tls)


def _engine_threads() -> int:
    """The main thread keeps one intra-op thread; the engine thread gets the rest (see workers.host)."""
    from workers.host import prepare_serving_process

    return prepare_serving_process()


@_user_errors
def cmd_generate(args: argparse.Namespace) -> int:
    from cluster.local import LocalBackend
    from router.frontend import Frontend
    from router.tokenizer import Tokenizer

    req = _request_from_args(args)
    dtype = _dtype(args)
    if args.ep_size > 1 and args.fp8_weights != "resident":
        raise RequestError("fp8_weights", "--ep-size loads FP8 weights resident; "
                                          "--fp8-weights dequantize needs --ep-size 1")
    if args.ep_size > 1:
        from cluster.ep import EPLocalBackend
        from workers.parallel import ExpertParallelError, PlacementError

        try:
            backend = EPLocalBackend.start(args.model, ep_size=args.ep_size, dtype=dtype)
        except (PlacementError, ExpertParallelError) as e:  # e.g. experts not divisible by --ep-size
            print(f"dsaserve: error: --ep-size {args.ep_size}: {e}", file=sys.stderr)
            return 2
    else:
        backend = LocalBackend.start(args.model, dtype=dtype, device=_device(args), num_threads=_engine_threads(),
                                     fp8_weights=args.fp8_weights, engine_config=_engine_config(args))
    with backend:
        frontend = Frontend(backend, Tokenizer.load(backend.model_dir))
        completion = asyncio.run(frontend.complete(req))
    _print_completion(completion, args.json)
    return 0


@_user_errors
def cmd_client_generate(args: argparse.Namespace) -> int:
    from router.client import Client

    req = _request_from_args(args)
    with Client(args.address, timeout=args.timeout, **client_tls(args)) as client:
        completion = client.generate(
            req.prompt, prompt_ids=req.prompt_ids, **{k: getattr(req.params, k) for k in _PARAM_NAMES}
        )
    _print_completion(completion, args.json)
    return 0


@_user_errors
def cmd_client_health(args: argparse.Namespace) -> int:
    """Print the health status; 0 when SERVING, 1 otherwise or when the server cannot be asked (a
    Kubernetes exec probe reads only the exit status)."""
    from router.client import Client, DsaServeError

    with Client(args.address, timeout=args.timeout, **client_tls(args)) as client:
        try:
            status = client.health(args.service)
        except DsaServeError as e:
            print(f"dsaserve: {args.address}: {e}", file=sys.stderr)
            return 1
    print(status)
    return 0 if status == "SERVING" else 1


def _tls_note(tls: Any) -> str:
    if tls is None:
        return ""
    return " with mutual TLS" if tls.mutual else " with TLS"


@_user_errors
def cmd_batch(args: argparse.Namespace) -> int:
    if args.address:
        from cluster.cli_jobs import cmd_batch_remote

        return cmd_batch_remote(args)
    from cluster.local import LocalBackend
    from router.batch import BatchJob
    from router.frontend import Frontend
    from router.tokenizer import Tokenizer

    job = BatchJob.open(args.input, args.output)  # reads and checks the files before loading a model
    with LocalBackend.start(args.model, dtype=_dtype(args), device=_device(args), num_threads=_engine_threads(),
                            fp8_weights=args.fp8_weights, engine_config=_engine_config(args)) as backend:
        frontend = Frontend(backend, Tokenizer.load(backend.model_dir))
        summary = asyncio.run(job.run(frontend, concurrency=args.concurrency))
    print(
        f"dsaserve: {summary.done} done ({summary.failed} with errors, {summary.retried} retried), "
        f"{summary.skipped} already in {args.output}, {len(summary.duplicates)} duplicate ids not run",
        file=sys.stderr,
    )
    return 0


# ---- arguments ------------------------------------------------------------------------------

_PARAM_NAMES = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "logprobs",
)


def _add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, default=None, help="checkpoint directory (default: the embedded tiny model)"
    )
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto",
        help="weight dtype; auto = bfloat16 on a GPU or a CPU with AVX-512-BF16 or AMX, float32 otherwise "
             "(default: auto)",
    )
    parser.add_argument(
        "--device", type=device_arg, default="auto",
        help="auto, cpu, cuda or cuda:N; auto = the first CUDA device, else the CPU (default: auto)",
    )
    parser.add_argument(
        "--enforce-eager", action="store_true",
        help="never replay decode steps from CUDA graphs (GPU only; the CPU always runs eagerly)",
    )
    parser.add_argument(
        "--fp8-weights", choices=("resident", "dequantize"), default="resident",
        help="an FP8 checkpoint's weights: keep them FP8 in memory, dequantized at use (resident), or "
             "expand them into --dtype at load (dequantize); other checkpoints are unaffected (default: resident)",
    )


def _engine_config(args: argparse.Namespace, **settings: Any) -> Any:
    """The local engines' ``EngineConfig``: ``settings`` plus what ``--enforce-eager`` says."""
    from workers.engine.config import EngineConfig

    return EngineConfig(**settings, **({"cuda_graph_max_batch": 0} if args.enforce_eager else {}))


def _device(args: argparse.Namespace) -> Any:
    """The torch device ``--device`` names (RequestError naming ``device`` when it is absent here)."""
    from workers.model.device import resolve_device

    try:
        return resolve_device(args.device)
    except ValueError as e:
        raise RequestError("device", str(e)) from None


def _dtype(args: argparse.Namespace) -> Any:
    """The torch dtype ``--dtype`` names on the device ``--device`` names."""
    from workers.model.device import resolve_dtype

    return resolve_dtype(args.dtype, _device(args))


def _add_request_args(parser: argparse.ArgumentParser) -> None:
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text prompt (needs the checkpoint's tokenizer)")
    prompt.add_argument("--prompt-ids", type=id_list, help="token-id prompt, comma separated: 0,42,7")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens to generate at most (default: 16)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--stop-token-ids", type=id_list, default=(), help="comma separated")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sentence token")
    parser.add_argument("--logprobs", type=int, default=None, help="top-n log-probabilities per token")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _request_from_args(args: argparse.Namespace) -> Any:
    from router.frontend import CompletionRequest
    from workers.engine.types import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        stop_token_ids=tuple(args.stop_token_ids),
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )
    return CompletionRequest(prompt=args.prompt, prompt_ids=args.prompt_ids, params=params)


def _print_completion(completion: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(completion.to_json(), ensure_ascii=False))
    elif completion.text:
        print(completion.text)
    else:  # no tokenizer: the ids are the output
        print(" ".join(map(str, completion.token_ids)))


def main(argv: list[str] | None = None) -> int:
    """Run these subcommands alone (``python -m cluster.cli_serve``); ``dsaserve`` wires them too."""
    parser = argparse.ArgumentParser(prog="dsaserve")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
