"""Cluster configuration: the YAML a user writes for ``dsaserve serve`` (and Helm values map onto).

Pydantic at the edge, ``extra="forbid"`` everywhere: a misspelled key is an error naming it, not a
silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from router.jobs.types import JobLimits
from router.policy import DSACostModel, RoutingConfig
from router.tls import TLSFrontConfig
from workers.engine.config import EngineConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkerGroupConfig(_Strict):
    """One kind of worker (prefill or decode) and its engine limits."""

    replicas: int = Field(1, ge=1, description="number of replicas of this worker kind")
    ep_size: int = Field(1, ge=1, description="expert-parallel ranks per replica: rank 0 runs the engine, every rank holds "
                         "1/ep_size of the routed experts (Ray actors in one placement group; num_cpus/num_gpus are per rank)")
    ep_timeout_s: float = Field(60.0, gt=0, description="expert parallelism: a rank silent this long fails the request and marks the replica unhealthy")
    num_blocks: int = Field(2048, ge=1, description="KV blocks (of block_size tokens) per replica")
    max_num_seqs: int = Field(64, ge=1, description="most sequences a replica runs at once")
    max_num_batched_tokens: int = Field(2048, ge=1, description="token budget of one engine step (chunked prefill size)")
    num_cpus: float = Field(0.25, gt=0, description="CPUs Ray reserves per replica")
    num_gpus: float = Field(0, ge=0, description="GPUs Ray reserves per replica (0 on CPU-only nodes)")
    torch_threads: int = Field(1, ge=1, description="intra-op threads of the replica's torch")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources a replica needs (e.g. {dsaserve_prefill: 1} to keep it on its worker group)")
    host_cache_blocks: int = Field(0, ge=0, description="context cache: evicted KV blocks kept in host memory per replica")
    disk_cache_dir: str | None = Field(None, description="context cache on disk, local to each node: every replica claims the "
                                       "subfolder <role>-<n> with the lowest free n, so a restarted replica finds its "
                                       "predecessor's blocks (kvstore/disk_slot.py); none: off")
    disk_cache_blocks: int = Field(0, ge=0, description="most KV blocks kept on disk per replica (files left by a previous "
                                   "replica in its folder count)")
    kv_memory_bytes: int | None = Field(None, ge=1, description="KV pool from a byte budget instead of num_blocks")
    kv_memory_fraction: float | None = Field(None, gt=0, le=1, description="KV pool from the memory the weights leave of this share of the device (as vLLM's gpu_memory_utilization); instead of num_blocks")
    cuda_graph_max_batch: int = Field(64, ge=0, description="decode steps of up to this many sequences replay CUDA graphs "
                                      "on GPU replicas (0: always eager, as vLLM's --enforce-eager)")

    @model_validator(mode="after")
    def _one_kv_budget(self) -> "WorkerGroupConfig":
        if self.kv_memory_bytes is not None and self.kv_memory_fraction is not None:
            raise ValueError("set kv_memory_bytes or kv_memory_fraction, not both")
        return self

    def engine(self, *, block_size: int, max_model_len: int | None, max_queue: int, lease_s: float,
               shared_disk_dir: str | None = None, shared_disk_blocks: int = 0) -> EngineConfig:
        return EngineConfig(
            shared_disk_dir=shared_disk_dir, shared_disk_blocks=shared_disk_blocks,
            num_blocks=self.num_blocks, block_size=block_size, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=max_model_len,
            max_queue=max_queue, lease_s=lease_s, host_cache_blocks=self.host_cache_blocks,
            disk_cache_dir=self.disk_cache_dir, disk_cache_blocks=self.disk_cache_blocks,
            kv_memory_bytes=self.kv_memory_bytes, kv_memory_fraction=self.kv_memory_fraction,
            cuda_graph_max_batch=self.cuda_graph_max_batch,
        )


class SharedDiskCacheConfig(_Strict):
    """One disk cache folder that every replica mounting it shares (kvstore/shared_disk.py)."""

    dir: str = Field(..., description="the folder: on one node any local path, across nodes a ReadWriteMany volume "
                     "mounted at the same path in every worker pod")
    max_blocks: int = Field(..., ge=1, description="most KV blocks kept in the folder, by all replicas together "
                            "(least recently used out first)")


class LimitsSettings(_Strict):
    """Request limits the router enforces (router/limits.py RequestLimits; 0: derived, see there)."""

    max_stop_strings: int = Field(16, ge=0, description="stop strings per request")
    max_stop_string_chars: int = Field(256, ge=1, description="characters of one stop string")
    max_stop_token_ids: int = Field(256, ge=0, description="stop token ids per request")
    max_request_id_chars: int = Field(256, ge=1, description="characters of a request id")
    max_cache_salt_chars: int = Field(256, ge=1, description="characters of a cache salt")
    max_prompt_chars: int = Field(0, ge=0, description="characters of a text prompt, checked before tokenizing (0: max(2^20, 16 × context))")
    max_message_bytes: int = Field(4 * 2**20, ge=1, description="largest gRPC request message (local mode; Serve's proxy keeps gRPC's 4 MiB)")
    max_concurrent_streams: int = Field(0, ge=0, description="concurrent gRPC calls per server (local mode; 0: max_queue + 64)")


class JobsSettings(_Strict):
    """Durable batch jobs (the OpenAI Batch API and gRPC BatchJobs), kept in Redis so that every router
    replica sees every job and a restarted router resumes them."""

    enabled: bool = Field(True, description="serve batch jobs (needs store_url or redis_url)")
    store_url: str | None = Field(None, description="redis://... for the jobs (none: the KV index's redis_url, "
                                  "with its connection options); $VARS expand in the router")
    limits: JobLimits = Field(default_factory=JobLimits, description="job limits and how job lines run")


class RouterConfig(_Strict):
    """The gRPC front door."""

    grpc_port: int = Field(50051, ge=1, le=65535, description="port of Ray Serve's gRPC proxy serving dsaserve.v1")
    http_port: int = Field(8000, ge=1, le=65535, description="port of Ray Serve's HTTP proxy: the OpenAI-compatible API, /health and /metrics (plaintext)")
    host: str = Field("127.0.0.1", description="address the proxies bind (0.0.0.0 in Kubernetes)")
    max_queue: int = Field(1024, ge=1, description="requests in flight before RESOURCE_EXHAUSTED")
    replicas: int = Field(1, ge=1, description="router replicas")
    startup_timeout_s: float = Field(120.0, ge=0, description="calls arriving before any worker is ready wait this long, then get UNAVAILABLE")
    limits: LimitsSettings = Field(default_factory=LimitsSettings, description="request limits (INVALID_ARGUMENT beyond them)")
    jobs: JobsSettings = Field(default_factory=JobsSettings, description="durable batch jobs")
    tls: TLSFrontConfig | None = Field(None, description="TLS on grpc_port (cert_file, key_file, client_ca_file for "
                                       "mutual TLS): Serve's proxy moves to tls.upstream_port behind a TLS front; none: plaintext")


class RedisConfig(_Strict):
    """Connection options of the KV index's Redis (the URL is ``redis_url``)."""

    password: str | None = Field(None, description="AUTH password (or put it in the URL)")
    username: str | None = Field(None, description="ACL user name")
    ssl_ca_certs: str | None = Field(None, description="CA bundle for TLS (rediss:// URLs)")
    ssl_certfile: str | None = Field(None, description="client certificate for mutual TLS")
    ssl_keyfile: str | None = Field(None, description="client key for mutual TLS")
    worker_ttl_s: float = Field(10.0, gt=0, description="a worker that stops heartbeating leaves the index after this")


class RoutingSettings(_Strict):
    """The cache-aware routing policy (router/policy.py RoutingConfig)."""

    policy: Literal["dsaserve", "round_robin", "least_load", "sglang_cache_aware", "dynamo_cost"] = Field(
        "dsaserve", description="routing policy")
    alpha: float = Field(4.0, ge=0, description="weight of the request's own (uncached) prefill cost")
    beta: float = Field(1.0, ge=0, description="weight of the work already queued on a worker")
    local_prefill_max_tokens: int = Field(1024, ge=0, description="conditional disaggregation: prefill on the decode worker when at most this many tokens are uncached (0: always disaggregate)")
    temperature_s: float = Field(0.05, ge=0, description="softmax temperature for tie breaking (0: argmin)")
    peer_pulls: bool = Field(True, description="a worker reads a prefix another worker (prefill or decode) holds "
                             "over the KV transfer backend when that is cheaper than computing it")
    link_bytes_per_s: float | None = Field(None, gt=0, description="KV transfer speed between workers for pull "
                                           "planning; none: measured from the workers' reads (25e9 until measured)")
    pending_ttl_s: float = Field(10.0, ge=0, description="the router counts a prompt's blocks as held by the worker "
                                 "it routed them to while the request is in flight and this long after, until "
                                 "the KV index shows them (0: only while in flight)")
    linear_flops_per_s: float | None = Field(None, gt=0, description="cost model: effective GEMM + attention rate of "
                                             "one prefill worker (none: one H800 node, 2.7e15)")
    index_flops_per_s: float | None = Field(None, gt=0, description="cost model: effective indexer rate of one "
                                            "prefill worker (none: one H800 node, 4.8e15)")

    def routing_config(self, model_config) -> RoutingConfig:
        """The policy's ``RoutingConfig`` for a model (``workers.model.config.ModelConfig``)."""
        hardware = {k: getattr(self, k) for k in ("linear_flops_per_s", "index_flops_per_s") if getattr(self, k)}
        return RoutingConfig(alpha=self.alpha, beta=self.beta, local_prefill_max_tokens=self.local_prefill_max_tokens,
                             temperature_s=self.temperature_s, peer_pulls=self.peer_pulls,
                             cost=DSACostModel.from_model_config(model_config, **hardware))


class ClusterConfig(_Strict):
    """The whole cluster: model, worker groups, KV transfer backend, router."""

    model: str = Field(..., description="checkpoint folder, or a preset name (tiny, small) created in the cache")
    prefill: WorkerGroupConfig = Field(default_factory=WorkerGroupConfig, description="prefill workers")
    decode: WorkerGroupConfig = Field(default_factory=WorkerGroupConfig, description="decode workers")
    transfer: Literal["nixl", "ray", "local"] = Field("nixl", description="how KV blocks move from prefill to decode")
    redis_url: str | None = Field(None, description="Redis for the KV index (none: routing by load only)")
    redis: RedisConfig = Field(default_factory=RedisConfig, description="Redis connection options")
    routing: RoutingSettings = Field(default_factory=RoutingSettings, description="cache-aware routing")
    router: RouterConfig = Field(default_factory=RouterConfig, description="the gRPC router")
    block_size: int = Field(64, ge=1, description="tokens per KV block")
    max_model_len: int | None = Field(None, ge=2, description="cap on prompt + output tokens (none: the model's)")
    shared_disk_cache: SharedDiskCacheConfig | None = Field(
        None, description="context cache shared by every prefill and decode replica (blocks evicted from their "
        "memory, crash-safe files indexed in Redis as a tier any of them reads); none: off")
    lease_s: float = Field(30.0, gt=0, description="how long prefill holds handed-off blocks for a decode worker")
    transfer_timeout_s: float = Field(30.0, gt=0, description="a KV read slower than this fails and falls back")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$", description="where replicas put weights "
                        "and KV: auto = the GPU Ray assigned the replica (num_gpus > 0), else its CPU; cpu; cuda[:N]")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="weight dtype of prefill and decode replicas; auto: bfloat16 where the replica's machine "
        "computes it natively (a GPU, a CPU with AVX-512-BF16 or AMX), float32 otherwise (workers/model/device.py)")
    fp8_weights: Literal["resident", "dequantize"] = Field(
        "resident", description="an FP8 checkpoint's weights: resident (kept FP8 with their block scales, "
        "computed blockwise) or dequantize (to dtype at load, the reference path; needs ep_size 1)")
    app_name: str = Field("dsaserve", description="Ray Serve application name")

    @model_validator(mode="after")
    def _fp8_dequantize_without_ep(self) -> "ClusterConfig":
        if self.fp8_weights == "dequantize" and max(self.prefill.ep_size, self.decode.ep_size) > 1:
            raise ValueError("fp8_weights: dequantize needs ep_size 1 (expert-parallel ranks load FP8 weights resident)")
        return self


class ClusterConfigError(ValueError):
    """The YAML is unreadable or invalid; the message names the field."""


def load_config(path: str | Path) -> ClusterConfig:
    """Read and validate a cluster YAML file."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ClusterConfigError(f"cannot read cluster config {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ClusterConfigError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ClusterConfigError(f"{p}: expected a mapping at the top level")
    try:
        return ClusterConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ClusterConfigError(f"{p}: {where}: {first['msg']} ({len(e.errors())} problem(s))") from None
