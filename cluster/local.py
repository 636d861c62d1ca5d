"""Local single-process mode: router-side logic + a prefill engine + a decode engine in one process,
an in-memory block index, local KV transfer. The embedded default and the mode most tests use."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import torch

from kvstore.transfer import LocalTransfer
from router.backend import ModelInfo
from router.dispatch import DispatchConfig, Dispatcher
from router.limits import RequestLimits
from router.policy import RoutingConfig, make_policy
from router.routing import CacheAwareRouting
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.types import GenerateRequest, RequestOutput, WorkerStats
from workers.model.checkpoint import load_model
from workers.model.model import DeepseekV32
from workers.worker import EngineLoop, EngineWorker

DEFAULT_PRESET = "tiny"
DEFAULT_SEED = 0


def cache_dir() -> Path:
    """Where the embedded default model lives: $DSASERVE_CACHE, else $XDG_CACHE_HOME/dsaserve."""
    if os.environ.get("DSASERVE_CACHE"):
        return Path(os.environ["DSASERVE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dsaserve"


def default_model_dir(preset: str = DEFAULT_PRESET) -> Path:
    """A preset model (default: the embedded tiny one), written on first use (random weights, the
    real tokenizer) into the cache."""
    from workers.model.presets import load_preset
    from workers.model.writer import copy_tokenizer, random_state_dict, write_checkpoint

    path = cache_dir() / "models" / f"{preset}-seed{DEFAULT_SEED}"
    if (path / "config.json").is_file():
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    config = load_preset(preset)
    write_checkpoint(tmp, config, random_state_dict(config, seed=DEFAULT_SEED))
    copy_tokenizer(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(path)  # atomic: a concurrent first run never sees a half-written model
    except OSError:
        if not (path / "config.json").is_file():
            raise
    return path


class LocalWorkers:
    """``router.dispatch.WorkerSet`` over the engines of one process (their health: ``health_error``)."""

    mode = "local"
    retryable: tuple[type[BaseException], ...] = ()  # an engine in this process cannot vanish

    def __init__(self, prefill: EngineWorker | None, decode: EngineWorker, health_error: Callable[[], str | None]) -> None:
        self._prefill, self._decode, self._health_error = prefill, decode, health_error
        self.expects_prefill = prefill is not None

    async def current(self) -> list[WorkerStats]:
        return self.snapshot()

    def snapshot(self) -> list[WorkerStats]:
        healthy = self._health_error() is None
        workers = [w for w in (self._prefill, self._decode) if w is not None]
        return [dataclasses.replace(w.stats(), healthy=healthy) for w in workers]

    def refresh(self) -> None:
        pass

    def health_error(self) -> str | None:
        return self._health_error()

    def prefill(self, worker_id: str) -> EngineWorker:
        assert self._prefill is not None and worker_id == self._prefill.worker_id
        return self._prefill

    def decode(self, worker_id: str | None) -> EngineWorker:
        return self._decode

    def holder(self, worker_id: str) -> EngineWorker:
        for w in (self._prefill, self._decode):
            if w is not None and w.worker_id == worker_id:
                return w
        raise KeyError(f"no worker {worker_id!r} in this process")


class LocalBackend:
    """The ``Backend`` of local mode: a ``router.dispatch.Dispatcher`` over two engines. Requests run
    prefill → KV handle → decode across them (``disaggregate=True``, the default) or wholly on one engine."""

    def __init__(self, model_dir: Path, engine_config: EngineConfig, *, disaggregate: bool = True,
                 dtype: torch.dtype = torch.float32, routing: RoutingConfig | None = None,
                 model: DeepseekV32 | None = None, num_threads: int | None = None,
                 limits: RequestLimits | None = None, device: torch.device | str = "cpu",
                 fp8_weights: str = "resident") -> None:
        """``dtype``: the weights' dtype (``workers.model.device.resolve_dtype`` turns a ``--dtype``
        setting into one). ``routing``: the cluster's policy settings; None always disaggregates (local
        mode exists to run that path). ``model``: an already built model to serve (e.g. rank 0 of an
        expert-parallel group); None loads ``model_dir``. ``num_threads``: intra-op threads of the engine
        thread (``workers.host.prepare_serving_process`` returns the count to pass). ``limits``: request
        limits (None: the defaults). ``device``: where the weights and the KV cache live
        (``workers.model.device.resolve_device``). ``fp8_weights``: ``load_model``'s option for an FP8
        checkpoint (``"resident"`` or ``"dequantize"``)."""
        self.model_dir = model_dir
        self.engine_config = engine_config
        model_id = model_dir.name
        self.transfer = LocalTransfer()
        decode_model = model if model is not None else load_model(
            model_dir, dtype=dtype, device=device, fp8_weights=fp8_weights)
        self.device = decode_model.embed.weight.device
        # Every engine both reads and holds: decode imports hand-offs, and each may pull a prefix the
        # other holds (a conversation's next turn reuses the blocks its answer filled on decode-0).
        self.decode_engine = Engine(decode_model, engine_config, role="decode" if disaggregate else "both",
                                    worker_id="decode-0", model_id=model_id, transfer=self.transfer,
                                    holder_factory=lambda storage: self.transfer.holder("decode-0", storage))
        engines = [self.decode_engine]
        self.prefill_engine: Engine | None = None
        if disaggregate:
            # Both engines serve the same weights: share the module (read-only at inference).
            self.prefill_engine = Engine(
                decode_model, engine_config, role="prefill", worker_id="prefill-0", model_id=model_id,
                holder_factory=lambda storage: self.transfer.holder("prefill-0", storage), transfer=self.transfer,
            )
            engines.insert(0, self.prefill_engine)
        self.loop = EngineLoop(engines, num_threads=num_threads).start()
        self.decode = EngineWorker(self.decode_engine)
        self.prefill = EngineWorker(self.prefill_engine) if self.prefill_engine else None
        mc = decode_model.config
        max_context = self.decode_engine.max_model_len
        self._info = ModelInfo(
            model_id=model_id, vocab_size=mc.vocab_size, max_context=max_context,
            max_tokens_limit=max_context - 1, max_queue=engine_config.max_queue,
            block_size=engine_config.block_size, eos_token_id=mc.eos_token_id, bos_token_id=mc.bos_token_id,
            index_topk=mc.index_topk, has_tokenizer=(model_dir / "tokenizer.json").is_file(),
            limits=(limits or RequestLimits()).resolved(max_context=max_context, max_queue=engine_config.max_queue),
        )
        policy = routing or RoutingConfig(local_prefill_max_tokens=0)
        self.routing = CacheAwareRouting(make_policy("dsaserve", policy), None, model_id=model_id,
                                         block_size=engine_config.block_size)
        workers = LocalWorkers(self.prefill, self.decode, self.health_error)
        self.dispatcher = Dispatcher(workers, self._info, self.routing, DispatchConfig(startup_timeout_s=0.0))

    @classmethod
    def start(cls, model_dir: str | Path | None = None, *, engine_config: EngineConfig | None = None,
              disaggregate: bool = True, routing: RoutingConfig | None = None,
              dtype: torch.dtype = torch.float32, num_threads: int | None = None,
              limits: RequestLimits | None = None, device: torch.device | str = "cpu",
              fp8_weights: str = "resident") -> "LocalBackend":
        path = Path(model_dir) if model_dir is not None else default_model_dir()
        return cls(path, engine_config or EngineConfig(), disaggregate=disaggregate, routing=routing, dtype=dtype,
                   num_threads=num_threads, limits=limits, device=device, fp8_weights=fp8_weights)

    def __enter__(self) -> "LocalBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.loop.stop()

    def info(self) -> ModelInfo:
        return self._info

    def health_error(self) -> str | None:
        """Why this backend's engines cannot serve (None when healthy)."""
        return self.loop.health_error()

    async def health(self) -> str | None:
        return await self.dispatcher.health()

    def stats(self) -> dict:
        return self.dispatcher.stats()

    def worker_stats(self) -> list[WorkerStats]:
        return self.dispatcher.workers.snapshot()

    def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        return self.dispatcher.generate(req)
