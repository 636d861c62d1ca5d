"""The Ray Serve application: prefill and decode deployments, and a router deployment served by
Ray Serve's native gRPC proxy with the same ``dsaserve.v1`` service as local mode.

Builder pattern (after Ray Serve LLM): prefill is bound first, its handle and decode's go into the
router. ``run(config)`` starts a local Ray when no address is given.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig, gRPCOptions
from ray.serve.handle import DeploymentHandle

from cluster.config import ClusterConfig
from cluster.ep import serve_options
from cluster.ray_workers import RayWorkers
from cluster.servers import DecodeServer, PrefillServer, ensure_stats_board
from kvstore.redis_index import RedisKVIndex
from router.backend import ModelInfo
from router.dispatch import DispatchConfig, Dispatcher
from router.frontend import Frontend
from router.jobs.grpc_service import BatchJobsServicer
from router.jobs.service import JobService
from router.jobs.store import open_store
from router.limits import RequestLimits
from router.pending import PendingRoutes
from router.policy import make_policy
from router.routing import CacheAwareRouting
from router.proto.dsaserve.v1 import dsaserve_pb2 as pb
from router.server import DsaServeServicer
from router.tokenizer import Tokenizer
from workers.model.config import ModelConfig

MAX_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.5
ROUTER_SPARE_CALLS = 64

GRPC_SERVICERS = [
    "router.proto.dsaserve.v1.dsaserve_pb2_grpc.add_DsaServeServicer_to_server",
    "router.proto.dsaserve.v1.dsaserve_pb2_grpc.add_BatchJobsServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


class _Aborted(Exception):
    """Raised after the status was set on Serve's gRPC context."""


class _ServeContext:
    """The slice of ``grpc.aio.ServicerContext`` our servicer uses, on top of Serve's context."""

    def __init__(self, grpc_context) -> None:
        self.grpc_context = grpc_context
        self.out: asyncio.Queue = asyncio.Queue()

    def invocation_metadata(self):
        return self.grpc_context.invocation_metadata()

    def time_remaining(self) -> float | None:
        return None  # Serve's proxy enforces the client's deadline and cancels the call

    async def write(self, message) -> None:
        await self.out.put(message)

    async def abort(self, code, details: str, trailing_metadata=()) -> None:
        self.grpc_context.set_code(code)
        self.grpc_context.set_details(details)
        if trailing_metadata:
            self.grpc_context.set_trailing_metadata(list(trailing_metadata))
        raise _Aborted(details)


@serve.ingress()
class RouterServer:
    """Serve deployment answering ``dsaserve.v1.DsaServe`` (and health) through Serve's gRPC proxy, and
    the OpenAI-compatible HTTP API (``router.http``) through Serve's HTTP proxy on ``router.http_port``."""

    def __init__(self, prefill: DeploymentHandle, decode: DeploymentHandle, model_dir: str, config: dict) -> None:
        cfg = ClusterConfig.model_validate(config)
        mc = ModelConfig.from_hf(model_dir)
        max_context = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        tokenizer = Tokenizer.load(model_dir)
        limits = RequestLimits(**cfg.router.limits.model_dump())
        info = ModelInfo(
            model_id=Path(model_dir).name, vocab_size=mc.vocab_size, max_context=max_context,
            max_tokens_limit=max_context - 1, max_queue=cfg.router.max_queue, block_size=cfg.block_size,
            eos_token_id=mc.eos_token_id, bos_token_id=mc.bos_token_id, index_topk=mc.index_topk,
            has_tokenizer=tokenizer is not None,
            limits=limits.resolved(max_context=max_context, max_queue=cfg.router.max_queue),
        )
        index = None
        if cfg.redis_url:
            index = RedisKVIndex(os.path.expandvars(cfg.redis_url), info.model_id, cfg.block_size, **redis_options(cfg))
        r = cfg.routing
        routing = CacheAwareRouting(make_policy(r.policy, r.routing_config(mc)), index, model_id=info.model_id,
                                    block_size=cfg.block_size, pending=PendingRoutes(r.pending_ttl_s),
                                    link_bytes_per_s=r.link_bytes_per_s)
        self.backend = Dispatcher(RayWorkers(prefill, decode), info, routing,
                                  DispatchConfig(startup_timeout_s=cfg.router.startup_timeout_s,
                                                 max_attempts=MAX_ATTEMPTS, retry_backoff_s=RETRY_BACKOFF_S))
        self.servicer = DsaServeServicer(Frontend(self.backend, tokenizer))
        self.jobs = job_service(cfg, Frontend(self.backend, tokenizer), info.model_id)
        self.jobs_servicer = BatchJobsServicer(self.jobs, self.servicer.caller_key) if self.jobs else None
        self._jobs_started = False

    def __serve_build_asgi_app__(self):
        """The HTTP app on this replica's Frontend (Serve calls it after ``__init__``)."""
        from router.http import build_app

        return build_app(self.servicer.frontend, jobs=self.jobs)

    def _start_jobs(self) -> None:
        """Start this replica's job runner on the loop its calls run on (the first call that reaches
        the replica: Serve's health check, readiness or any RPC)."""
        if self.jobs is not None and not self._jobs_started:
            self._jobs_started = True
            self.jobs.start()

    async def check_health(self) -> None:
        self._start_jobs()

    async def _stream(self, call, grpc_context) -> AsyncIterator:
        ctx = _ServeContext(grpc_context)
        task = asyncio.create_task(call(ctx))
        try:
            while True:
                getter = asyncio.create_task(ctx.out.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                while not ctx.out.empty():
                    yield ctx.out.get_nowait()
                task.result()  # re-raises _Aborted after the status was set
                return
        finally:
            task.cancel()

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        async for msg in self._stream(lambda ctx: self.servicer.Generate(request, ctx), grpc_context):
            yield msg

    async def GenerateBatch(self, request_stream, grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        async for msg in self._stream(lambda ctx: self.servicer.GenerateBatch(request_stream, ctx), grpc_context):
            yield msg

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context) -> pb.TokenizeResponse:
        return await self.servicer.Tokenize(request, _ServeContext(grpc_context))

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context) -> pb.ListModelsResponse:
        return await self.servicer.ListModels(request, _ServeContext(grpc_context))

    async def Status(self, request: pb.StatusRequest, grpc_context) -> pb.StatusResponse:
        return await self.servicer.Status(request, _ServeContext(grpc_context))

    async def _jobs(self, ctx: _ServeContext) -> BatchJobsServicer:
        """This replica's jobs servicer (its runner started); UNIMPLEMENTED when jobs are off."""
        self._start_jobs()
        if self.jobs_servicer is None:
            await ctx.abort(grpc.StatusCode.UNIMPLEMENTED, "batch jobs are off: set router.jobs.store_url or redis_url")
        return self.jobs_servicer

    async def _jobs_call(self, name: str, request, grpc_context):
        ctx = _ServeContext(grpc_context)
        return await getattr(await self._jobs(ctx), name)(request, ctx)

    async def CreateJob(self, request: pb.CreateJobRequest, grpc_context) -> pb.Job:
        return await self._jobs_call("CreateJob", request, grpc_context)

    async def GetJob(self, request: pb.GetJobRequest, grpc_context) -> pb.Job:
        return await self._jobs_call("GetJob", request, grpc_context)

    async def ListJobs(self, request: pb.ListJobsRequest, grpc_context) -> pb.ListJobsResponse:
        return await self._jobs_call("ListJobs", request, grpc_context)

    async def CancelJob(self, request: pb.CancelJobRequest, grpc_context) -> pb.Job:
        return await self._jobs_call("CancelJob", request, grpc_context)

    async def StreamResults(self, request: pb.StreamResultsRequest, grpc_context) -> AsyncIterator[pb.JobResult]:
        servicer = await self._jobs(_ServeContext(grpc_context))
        async for msg in self._stream(lambda ctx: servicer.StreamResults(request, ctx), grpc_context):
            yield msg

    async def Check(self, request, grpc_context):
        """SERVING only while a Generate would succeed (``Dispatcher.health``)."""
        from grpc_health.v1 import health_pb2

        ok = await self.backend.health() is None
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    def stats(self) -> dict:
        return self.backend.stats()

    async def ready(self) -> str | None:
        """Why a Generate would not succeed now (None: it would)."""
        self._start_jobs()
        return await self.backend.health()


def job_service(config: ClusterConfig, frontend: Frontend, model_id: str) -> JobService | None:
    """The replica's batch jobs, in Redis (``router.jobs.store_url``, else the KV index's ``redis_url``);
    None when jobs are off or no Redis is configured."""
    settings = config.router.jobs
    url = settings.store_url or config.redis_url
    if not settings.enabled or not url:
        return None
    options = redis_options(config) if not settings.store_url else {}
    store = open_store(os.path.expandvars(url), redis_options=options)
    return JobService(store, frontend, settings.limits, model_id=model_id, owner=f"router-{os.getpid()}-{os.urandom(4).hex()}")


def redis_options(config: ClusterConfig) -> dict:
    """RedisKVIndex keyword options; ``$VARS`` in them expand in the process that connects (a
    Kubernetes Secret reaches the pods as an environment variable, never the Serve config)."""
    opts = config.redis.model_dump(exclude={"worker_ttl_s"}, exclude_none=True)
    return {k: os.path.expandvars(v) if isinstance(v, str) else v for k, v in opts.items()}


def resolve_model(model: str) -> Path:
    """A checkpoint folder, or a preset name created (once) in the cache."""
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    from cluster.local import default_model_dir
    from workers.model.presets import PRESETS

    if model in PRESETS:
        return default_model_dir(model)
    raise FileNotFoundError(f"model {model!r}: no config.json there, and not a preset ({', '.join(PRESETS)})")


def build_app(config: ClusterConfig, model_dir: Path):
    """Bind the deployments: prefill and decode first, their handles into the router."""
    common = dict(block_size=config.block_size, max_model_len=config.max_model_len, max_queue=config.router.max_queue,
                  lease_s=config.lease_s)
    if config.shared_disk_cache is not None:
        common.update(shared_disk_dir=config.shared_disk_cache.dir, shared_disk_blocks=config.shared_disk_cache.max_blocks)
    index = None
    if config.redis_url:
        index = {"url": config.redis_url, "ttl_s": config.redis.worker_ttl_s, "options": redis_options(config)}
    router_config = RequestRouterConfig(request_router_class="cluster.request_router.WorkerIdRequestRouter")

    def group(cls, name, g):
        ep = {"ep_size": g.ep_size, "timeout_s": g.ep_timeout_s, "num_cpus": g.num_cpus, "num_gpus": g.num_gpus,
              "resources": g.resources}
        return serve.deployment(cls, name=name).options(
            num_replicas=g.replicas,
            ray_actor_options={"num_cpus": g.num_cpus, "num_gpus": g.num_gpus, **({"resources": g.resources} if g.resources else {})},
            max_ongoing_requests=max(8, g.max_num_seqs * 2), request_router_config=router_config,
            **serve_options(g.ep_size, g.num_cpus, g.num_gpus, g.resources),
        ).bind(str(model_dir), g.engine(**common), config.transfer, g.torch_threads, config.transfer_timeout_s, index,
               ep if g.ep_size > 1 else None, dtype=config.dtype, device=config.device,
               fp8_weights=config.fp8_weights)

    prefill = group(PrefillServer, "prefill", config.prefill)
    decode = group(DecodeServer, "decode", config.decode)
    # The router admits max_queue requests in flight (RESOURCE_EXHAUSTED with pushback beyond); Serve
    # lets a little more through for health and status calls, and its own queue is bounded too (its
    # overflow is RESOURCE_EXHAUSTED as well), so nothing queues without bound.
    router = serve.deployment(RouterServer, name="router").options(
        num_replicas=config.router.replicas, ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=config.router.max_queue + ROUTER_SPARE_CALLS,
        max_queued_requests=config.router.max_queue,
    )
    return router.bind(prefill, decode, str(model_dir), config.model_dump())


def start(config: ClusterConfig, address: str | None = None) -> DeploymentHandle:
    """Start (or join) Ray, start Serve's proxies on the configured ports, deploy the app. With
    ``router.tls`` Serve's gRPC proxy takes ``router.tls.upstream_port``: the caller runs the TLS
    front on ``router.grpc_port`` (router/tls_front.py)."""
    model_dir = resolve_model(config.model)
    if not ray.is_initialized():
        env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
        ray.init(address=address, runtime_env=env, namespace="dsaserve", ignore_reinit_error=True,
                 **({} if address else {"include_dashboard": False}))
    ensure_stats_board()
    serve.start(
        http_options={"host": config.router.host, "port": config.router.http_port},
        grpc_options=gRPCOptions(port=config.router.tls.upstream_port if config.router.tls else config.router.grpc_port,
                                 grpc_servicer_functions=GRPC_SERVICERS),
    )
    return serve.run(build_app(config, model_dir), name=config.app_name, route_prefix="/")


def shutdown() -> None:
    serve.shutdown()
    ray.shutdown()


def wait_ready(handle: DeploymentHandle, config: ClusterConfig, timeout_s: float = 120.0) -> dict:
    """Block until a Generate would succeed (the router's readiness) and every replica reports
    stats, or the timeout passes; returns the stats.

    Raises:
        TimeoutError: the router never became ready (its reason is in the message).
    """
    expected = config.prefill.replicas + config.decode.replicas
    deadline = time.monotonic() + timeout_s
    while True:
        problem = handle.ready.remote().result()
        stats = handle.stats.remote().result()
        if problem is None and len(stats["workers"]) >= expected:
            return stats
        if time.monotonic() > deadline:
            if problem is None:
                return stats  # serving, with fewer replicas than configured
            raise TimeoutError(f"cluster not ready after {timeout_s:g} s: {problem}")
        time.sleep(0.5)


def app_builder(args: dict):
    """Serve application builder for config-file deployments (KubeRay's ``serveConfigV2``):
    ``import_path: cluster.app:app_builder`` with ``args`` = the cluster config mapping (as in the
    YAML of ``dsaserve serve``). The gRPC proxy options go in the Serve config's ``grpc_options``
    (``grpc_servicer_functions`` = ``cluster.app.GRPC_SERVICERS``)."""
    config = ClusterConfig.model_validate(args)
    ensure_stats_board()
    return build_app(config, resolve_model(config.model))
