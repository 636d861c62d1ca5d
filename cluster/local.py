"""Local single-process mode: router-side logic + a prefill engine + a decode engine in one process,
an in-memory block index, local KV transfer. The embedded default and the mode most tests use."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import torch

from kvstore.transfer import LocalTransfer
from router.backend import AdmissionError, ModelInfo
from router.disagg import generate_disaggregated
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


class LocalBackend:
    """The ``Backend`` of local mode. Requests run prefill → KV handle → decode across two engines
    (``disaggregate=True``, the default) or wholly on one engine."""

    def __init__(self, model_dir: Path, engine_config: EngineConfig, *, disaggregate: bool = True,
                 dtype: torch.dtype = torch.float32, routing: RoutingConfig | None = None,
                 model: DeepseekV32 | None = None, num_threads: int | None = None) -> None:
        """``dtype``: the weights' dtype (``workers.model.device.resolve_dtype`` turns a ``--dtype``
        setting into one). ``model``: an already built model to serve (e.g. rank 0 of an
        expert-parallel group); None loads ``model_dir``. ``num_threads``: intra-op threads of the engine
        thread (``workers.host.prepare_serving_process`` returns the count to pass)."""
        self.model_dir = model_dir
        self.engine_config = engine_config
        model_id = model_dir.name
        self.transfer = LocalTransfer()
        decode_model = model if model is not None else load_model(model_dir, dtype=dtype)
        self.decode_engine = Engine(decode_model, engine_config, role="decode" if disaggregate else "both",
                                    worker_id="decode-0", model_id=model_id, transfer=self.transfer)
        engines = [self.decode_engine]
        self.prefill_engine: Engine | None = None
        if disaggregate:
            # Both engines serve the same weights: share the module (read-only at inference).
            self.prefill_engine = Engine(
                decode_model, engine_config, role="prefill", worker_id="prefill-0", model_id=model_id,
                holder_factory=lambda storage: self.transfer.holder("prefill-0", storage),
            )
            engines.insert(0, self.prefill_engine)
        self.loop = EngineLoop(engines, num_threads=num_threads).start()
        self.decode = EngineWorker(self.decode_engine)
        self.prefill = EngineWorker(self.prefill_engine) if self.prefill_engine else None
        mc = decode_model.config
        self._info = ModelInfo(
            model_id=model_id, vocab_size=mc.vocab_size, max_context=self.decode_engine.max_model_len,
            max_tokens_limit=self.decode_engine.max_model_len - 1, max_queue=engine_config.max_queue,
            block_size=engine_config.block_size, eos_token_id=mc.eos_token_id, bos_token_id=mc.bos_token_id,
            index_topk=mc.index_topk, has_tokenizer=(model_dir / "tokenizer.json").is_file(),
        )
        # The cluster's policy; by default local mode always disaggregates (it exists to run that path).
        self.routing = CacheAwareRouting(make_policy("dsaserve", routing), None, model_id=model_id,
                                         block_size=engine_config.block_size) if routing else None
        self._in_flight = 0
        self._requests_total = 0
        self._errors_total = 0

    @classmethod
    def start(cls, model_dir: str | Path | None = None, *, engine_config: EngineConfig | None = None,
              disaggregate: bool = True, routing: RoutingConfig | None = None,
              dtype: torch.dtype = torch.float32, num_threads: int | None = None) -> "LocalBackend":
        path = Path(model_dir) if model_dir is not None else default_model_dir()
        return cls(path, engine_config or EngineConfig(), disaggregate=disaggregate, routing=routing, dtype=dtype,
                   num_threads=num_threads)

    def __enter__(self) -> "LocalBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.loop.stop()

    def info(self) -> ModelInfo:
        return self._info

    def health_error(self) -> str | None:
        """Why this backend cannot serve (None when healthy)."""
        return None if self.loop.error is None else f"engine loop stopped: {self.loop.error}"

    def stats(self) -> dict:
        router = {"requests_total": self._requests_total, "in_flight": self._in_flight, "errors_total": self._errors_total}
        return {"mode": "local", "router": router, "workers": self.worker_stats()}

    def worker_stats(self) -> list[WorkerStats]:
        engines = [e for e in (self.prefill_engine, self.decode_engine) if e is not None]
        healthy = self.health_error() is None
        return [dataclasses.replace(e.stats(), healthy=healthy) for e in engines]

    async def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        if self._in_flight >= self.engine_config.max_queue:
            raise AdmissionError(f"admission queue full ({self.engine_config.max_queue} requests in flight)", retry_after_s=1.0)
        error = self.health_error()
        if error is not None:
            from router.backend import BackendUnavailable

            raise BackendUnavailable(error)
        self._in_flight += 1
        self._requests_total += 1
        try:
            local = self.prefill is None
            if not local and self.routing is not None:
                decision = await self.routing.decide(req, self.worker_stats())
                local = decision.prefill_worker is None  # conditional disaggregation
            if local:
                stream = self.decode.generate(req)
            else:
                stream = generate_disaggregated(req, self.prefill, self.decode, eos_token_id=self._info.eos_token_id,
                                                max_model_len=self._info.max_context)
            async with aclosing(stream) as outs:
                async for out in outs:
                    if out.finish_reason == "error":
                        self._errors_total += 1
                    yield out
        finally:
            self._in_flight -= 1
