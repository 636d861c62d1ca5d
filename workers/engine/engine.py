"""Engine: model runner + paged KV + scheduler + sampler, in one of three roles.

- ``both``: runs whole requests.
- ``prefill``: runs the prompt, samples the first token, and hands the KV over as a ``KVHandle``;
  the blocks stay leased until ``release`` (or lease expiry).
- ``decode``: ``import_kv`` pulls a handle's blocks through a ``KVTransfer`` and continues decoding.
  It can still prefill: a preempted sequence is recomputed locally.

Thread model: ``add_request``/``import_kv``/``abort``/``release`` may be called from any thread; they
queue commands that ``step()`` applies on the engine's own thread, so scheduling state has one owner.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvstore.block_pool import BlockEvent, BlockPool
from kvstore.hashing import HASH_VERSION, BlockHash, first_block_extra, self_test
from kvstore.paged import BlockLayout, PagedKVStorage
from kvstore.tiers import ContextCache, TierEvent
from kvstore.transfer import KVHolder, KVTransfer, TransferError
from workers.model.model import DeepseekV32

from .config import EngineConfig, Role
from .runner import ModelRunner
from .sampler import make_generator, sample
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence, SeqStatus
from .stop import finish_reason
from .types import GenerateRequest, KVHandle, LayoutFingerprint, RequestOutput, Usage, WorkerStats

Sink = Callable[[RequestOutput | KVHandle], None]
log = logging.getLogger(__name__)


@dataclass
class _Import:
    request: GenerateRequest
    handle: KVHandle
    sink: Sink
    on_read: Callable[[Exception | None], None]


class Engine:
    """One model replica's serving loop. See the module docstring for roles and threading."""

    def __init__(
        self,
        model: DeepseekV32,
        config: EngineConfig,
        *,
        role: Role = "both",
        worker_id: str = "worker-0",
        model_id: str = "model",
        transfer: KVTransfer | None = None,
        holder_factory: Callable[[PagedKVStorage], KVHolder] | None = None,
        on_block_event: Callable[[BlockEvent, BlockHash], None] | None = None,
        on_tier_event: TierEvent | None = None,
    ) -> None:
        self_test()
        mc = model.config
        self.model, self.config, self.role = model, config, role
        self.worker_id, self.model_id, self.transfer = worker_id, model_id, transfer
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        mode = config.indexer_mode or ("exact" if model.embed.weight.dtype == torch.float32 else "fp8")
        model.configure(indexer=mode)
        dtype = model.embed.weight.dtype
        self.layout = BlockLayout(
            num_layers=mc.num_hidden_layers, block_size=config.block_size, latent_dim=mc.latent_dim,
            latent_dtype=dtype, index_dim=mc.index_head_dim,
            index_dtype=torch.float8_e4m3fn if mode == "fp8" else torch.float32,
        )
        self.storage = PagedKVStorage(self.layout, config.num_blocks, device=model.embed.weight.device)
        self.context_cache = None
        if config.host_cache_blocks > 0 or (config.disk_cache_dir and config.disk_cache_blocks > 0):
            self.context_cache = ContextCache(
                self.layout.bytes_per_block, config.host_cache_blocks, config.disk_cache_dir,
                config.disk_cache_blocks, on_event=on_tier_event,
            )
        self.pool = BlockPool(config.num_blocks, on_event=on_block_event,
                              on_evict=self._demote if self.context_cache else None)
        self.scheduler = Scheduler(config, self.pool, restore=self._restore if self.context_cache else None)
        self.runner = ModelRunner(model, self.storage)
        # The holder side of the KV transfer backend (prefill role): publishes where blocks live.
        self.holder = holder_factory(self.storage) if holder_factory else None
        self.fingerprint = LayoutFingerprint(
            model_id=model_id, dtype=str(dtype).removeprefix("torch."), index_dtype=mode,
            block_size=config.block_size, hash_version=HASH_VERSION, num_layers=mc.num_hidden_layers,
            bytes_per_block=self.layout.bytes_per_block,
        )
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self.wake_event = threading.Event()  # an EngineLoop shares one across its engines
        self._seqs: dict[str, Sequence] = {}
        self._sinks: dict[str, Sink] = {}
        self._leases: dict[str, tuple[Sequence, float]] = {}
        self._imports: list[_Import] = []
        self._tokens_done = 0
        self.requests_total = 0
        self._started = time.monotonic()
        self._failed: str | None = None  # set by fail_all: the engine runs no more forwards
        self._fail_lock = threading.Lock()

    # ------------------------------------------------------------------ any thread
    def add_request(self, request: GenerateRequest, sink: Sink) -> None:
        with self._fail_lock:
            if self._failed is None:
                self._inbox.put(("add", request, sink))
                self.wake_event.set()
                return
        self._send(request.request_id, sink, self._error_output(request, self._failed))

    def import_kv(self, request: GenerateRequest, handle: KVHandle, sink: Sink, on_read: Callable[[Exception | None], None]) -> None:
        with self._fail_lock:
            if self._failed is None:
                self._inbox.put(("import", _Import(request, handle, sink, on_read)))
                self.wake_event.set()
                return
        self._notify_read(_Import(request, handle, sink, on_read), TransferError(self._failed))

    def fail_all(self, message: str) -> None:
        """The engine cannot run forwards any more (its loop crashed, e.g. an expert-parallel rank
        died): end every queued and running request with an ``error`` output naming ``message``; later
        requests get the same at once. Call it once the loop has stopped stepping this engine."""
        with self._fail_lock:
            self._failed = message
            queued = []
            while not self._inbox.empty():
                queued.append(self._inbox.get_nowait())
        for cmd in queued:
            if cmd[0] == "add":
                self._send(cmd[1].request_id, cmd[2], self._error_output(cmd[1], message))
            elif cmd[0] == "import":
                self._imports.append(cmd[1])
        for imp in self._imports:
            self._notify_read(imp, TransferError(message))
        self._imports = []
        for seq in list(self._seqs.values()):
            self._emit(seq, "error", message)
            self._finish(seq)

    @staticmethod
    def _error_output(request: GenerateRequest, message: str) -> RequestOutput:
        return RequestOutput(request_id=request.request_id, new_token_ids=(), finished=True,
                             usage=Usage(len(request.prompt_token_ids), 0, 0), finish_reason="error", error=message)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self.wake_event.set()

    def release(self, request_id: str) -> None:
        """Drop the lease on a handed-off request's blocks (the decode worker has read them)."""
        self._inbox.put(("release", request_id))
        self.wake_event.set()

    def stats(self) -> WorkerStats:
        elapsed = max(1e-9, time.monotonic() - self._started)
        return WorkerStats(
            worker_id=self.worker_id, role=self.role, waiting=len(self.scheduler.waiting) + len(self._imports),
            running=len(self.scheduler.running), free_blocks=self.pool.num_free,
            total_blocks=self.config.num_blocks, tokens_per_s=self._tokens_done / elapsed,
            requests_total=self.requests_total,
        )

    def status(self) -> dict:
        """JSON-able status for ``dsaserve status``: stats plus the KV transfer counters."""
        s = self.stats()
        side = self.transfer if self.transfer is not None else self.holder
        kv = side.stats() if side is not None and hasattr(side, "stats") else {}
        default_backend = getattr(side, "name", "none")
        return {
            "id": s.worker_id, "role": s.role, "requests_total": s.requests_total, "running": s.running,
            "waiting": s.waiting, "free_blocks": s.free_blocks, "total_blocks": s.total_blocks,
            "tokens_per_s": round(s.tokens_per_s, 2), "queued_tokens": self.queued_prefill_tokens(),
            "kv_transfer": {"backend": default_backend, "bytes": 0, "transfers": 0, "failures": 0, **kv},
        }

    def queued_prefill_tokens(self) -> int:
        """Prompt tokens still to prefill (waiting and running); read racily from other threads."""
        seqs = list(self.scheduler.waiting) + list(self.scheduler.running)
        return sum(s.num_pending for s in seqs if s.num_pending > 1)

    def block_snapshot(self) -> dict[str, list[BlockHash]]:
        """Every block hash this engine can serve, per tier (for re-registering with an index)."""
        for _ in range(10):  # the engine thread may change the maps while we copy: retry
            try:
                out = {"device": list(self.pool.hash_to_block)}
                if self.context_cache is not None:
                    out.update(self.context_cache.hashes())
                return out
            except RuntimeError:
                continue
        return {"device": []}

    # ------------------------------------------------------------------ engine thread
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._imports or self._leases or not self._inbox.empty())

    def step(self) -> bool:
        """Apply queued commands, run one scheduled batch, emit outputs. True if a forward ran."""
        self._drain_inbox()
        self._expire_leases()
        self._try_imports()
        out = self.scheduler.schedule()
        if not out:
            return False
        self._run(out)
        return True

    def _run(self, out: SchedulerOutput) -> None:
        sampled: list[tuple[Sequence, torch.Tensor]] = []
        if out.decodes:
            logits = self.runner.decode(out.decodes)
            for seq, row in zip(out.decodes, logits):
                seq.num_computed_tokens += 1
                sampled.append((seq, row))
        for seq, n in out.prefills:
            logits = self.runner.prefill(seq, n)
            seq.num_computed_tokens += n
            if seq.num_pending == 0:
                sampled.append((seq, logits))
        self._tokens_done += out.num_tokens
        for seq in out.decodes + [s for s, _ in out.prefills]:
            self._commit_blocks(seq)
        if sampled:
            seqs = [s for s, _ in sampled]
            tokens, logprobs = sample(torch.stack([l for _, l in sampled]), [s.request.params for s in seqs], [s.generator for s in seqs])
            for seq, token, lp in zip(seqs, tokens, logprobs):
                self._append(seq, token, lp)

    def _demote(self, block: int, block_hash: BlockHash) -> None:
        self.context_cache.demote(block_hash, self.storage.read_blocks([block])[0])

    def _restore(self, hashes: list[BlockHash]) -> list[int]:
        """Load the leading ``hashes`` found in the context cache into fresh, committed blocks."""
        out: list[int] = []
        for h in hashes:
            if not self.pool.can_allocate(1):
                break
            data = self.context_cache.fetch(h)
            if data is None:
                break
            block = self.pool.allocate(1)[0]
            self.storage.write_blocks([block], data[None])
            self.pool.commit(block, h)
            out.append(block)
        return out

    def _commit_blocks(self, seq: Sequence) -> None:
        bs = self.config.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        if full > seq.committed_blocks:
            hashes = seq.full_block_hashes(bs, full * bs)
            for i in range(seq.committed_blocks, full):
                self.pool.commit(seq.block_table[i], hashes[i])
            seq.committed_blocks = full

    def _append(self, seq: Sequence, token: int, logprob) -> None:
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        if seq.handoff and seq.num_output_tokens == 1:
            self._hand_off(seq)
            return
        reason = finish_reason(seq.request.params, token, seq.num_output_tokens, len(seq.token_ids), self.model.config.eos_token_id, self.max_model_len)
        delivered = self._emit(seq, reason)
        if reason is not None or not delivered:
            self._finish(seq)  # finished, or nobody is listening any more: free its blocks now

    def _send(self, request_id: str, sink: Sink, item: RequestOutput | KVHandle) -> bool:
        """Deliver to the caller; False when the caller is gone (e.g. its event loop closed)."""
        try:
            sink(item)
            return True
        except Exception:  # a vanished caller must never stop the engine
            log.info("caller of %s is gone; dropping the request", request_id)
            return False

    def _emit(self, seq: Sequence, reason, error: str | None = None) -> bool:
        new = tuple(seq.token_ids[seq.prompt_len + seq.emitted :])
        lps = tuple(seq.logprobs[seq.emitted :]) if seq.logprobs else ()
        seq.emitted = seq.num_output_tokens
        ttft = None if seq.first_token_time is None else seq.first_token_time - seq.arrival
        sink = self._sinks.get(seq.request_id)
        if sink is None:
            return False
        return self._send(seq.request_id, sink, RequestOutput(
            request_id=seq.request_id, new_token_ids=new, finished=reason is not None,
            usage=Usage(seq.prompt_len, seq.num_cached_tokens, seq.num_output_tokens),
            finish_reason=reason, logprobs=lps, ttft_s=ttft, error=error,
        ))

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self.pool.release(seq.block_table)
        seq.block_table = []
        seq.status = SeqStatus.FINISHED
        self._seqs.pop(seq.request_id, None)
        self._sinks.pop(seq.request_id, None)

    def _hand_off(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        seq.status = SeqStatus.LEASED
        expires = time.time() + self.config.lease_s
        self._leases[seq.request_id] = (seq, expires)
        handle = KVHandle(
            worker_id=self.worker_id, request_id=seq.request_id, block_ids=tuple(seq.block_table),
            num_tokens=seq.num_computed_tokens, first_token=seq.token_ids[-1], fingerprint=self.fingerprint,
            lease_expires_at=expires, cached_tokens=seq.num_cached_tokens,
            first_logprob=seq.logprobs[0] if seq.logprobs else None,
            endpoint=self.holder.endpoint(seq.block_table, seq.request_id) if self.holder else {},
        )
        sink = self._sinks.pop(seq.request_id, None)
        self._seqs.pop(seq.request_id, None)
        if sink is None or not self._send(seq.request_id, sink, handle):
            self._release_lease(seq.request_id)

    def _drain_inbox(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            kind = cmd[0]
            if kind == "add":
                self._add(cmd[1], cmd[2])
            elif kind == "import":
                self._imports.append(cmd[1])
            elif kind == "abort":
                self._abort(cmd[1])
            elif kind == "release":
                self._release_lease(cmd[1])

    def _add(self, request: GenerateRequest, sink: Sink) -> None:
        self.requests_total += 1
        seq = self._new_sequence(request, list(request.prompt_token_ids))
        seq.handoff = self.role == "prefill"
        self._sinks[request.request_id] = sink
        error = self._capacity_error(len(seq.token_ids), request.params.max_tokens)
        if error:
            self._emit(seq, "error", error)
            self._sinks.pop(request.request_id, None)
            return
        self._seqs[request.request_id] = seq
        self.scheduler.add(seq)

    def _new_sequence(self, request: GenerateRequest, token_ids: list[int]) -> Sequence:
        return Sequence(
            request=request, token_ids=token_ids, prompt_len=len(request.prompt_token_ids),
            extra=first_block_extra(self.model_id, request.cache_salt), generator=make_generator(request.params),
        )

    def _capacity_error(self, prompt_len: int, max_tokens: int) -> str | None:
        if prompt_len + (1 if self.role == "prefill" else max_tokens) > self.max_model_len:
            return f"prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds max_model_len ({self.max_model_len})"
        need = -(-min(prompt_len + max_tokens, self.max_model_len) // self.config.block_size)
        if need > self.config.num_blocks:
            return f"request needs {need} KV blocks; this worker has {self.config.num_blocks}"
        return None

    def _abort(self, request_id: str) -> None:
        self._release_lease(request_id)
        self._imports = [imp for imp in self._imports if imp.request.request_id != request_id]
        seq = self._seqs.get(request_id)
        if seq is not None:
            self._finish(seq)

    def _release_lease(self, request_id: str) -> None:
        lease = self._leases.pop(request_id, None)
        if lease is not None:
            self.pool.release(lease[0].block_table)

    def _expire_leases(self) -> None:
        if self.holder is not None:
            for rid in self.holder.read_done():
                self._release_lease(rid)
        now = time.time()
        for rid, (seq, expires) in list(self._leases.items()):
            if expires < now:
                self._release_lease(rid)

    @staticmethod
    def _notify_read(imp: _Import, err: Exception | None) -> None:
        try:
            imp.on_read(err)
        except Exception:  # the caller is gone; its request is dropped by the next send
            log.info("caller of %s is gone", imp.request.request_id)

    def _try_imports(self) -> None:
        pending = []
        for imp in self._imports:
            if not self._import_one(imp):
                pending.append(imp)
        self._imports = pending

    def _import_one(self, imp: _Import) -> bool:
        """Pull a handle's blocks and start decoding; False to retry when blocks are short."""
        handle, request = imp.handle, imp.request
        self.requests_total += 1
        if handle.fingerprint != self.fingerprint:
            self._notify_read(imp, TransferError(f"KV layout mismatch: holder {handle.fingerprint} vs this worker {self.fingerprint}"))
            return True
        if self.transfer is None:
            self._notify_read(imp, TransferError(f"worker {self.worker_id} has no KV transfer backend"))
            return True
        error = self._capacity_error(len(request.prompt_token_ids), request.params.max_tokens)
        if error:
            self._notify_read(imp, TransferError(error))
            return True
        if not self.pool.can_allocate(len(handle.block_ids)):
            return False
        blocks = self.pool.allocate(len(handle.block_ids))
        try:
            self.transfer.read(handle, self.storage, blocks)
        except Exception as e:  # any failure: free what we took, report, never decode garbage
            self.pool.release(blocks)
            self._notify_read(imp, e if isinstance(e, TransferError) else TransferError(str(e)))
            return True
        seq = self._new_sequence(request, list(request.prompt_token_ids) + [handle.first_token])
        seq.block_table, seq.num_computed_tokens = blocks, handle.num_tokens
        seq.num_cached_tokens, seq.emitted, seq.admitted_once = handle.cached_tokens, 1, True
        seq.first_token_time = time.monotonic()
        if handle.first_logprob is not None:
            seq.logprobs.append(handle.first_logprob)
        self._commit_blocks(seq)
        self._seqs[request.request_id] = seq
        self._sinks[request.request_id] = imp.sink
        self.scheduler.add_running(seq)
        self._notify_read(imp, None)
        return True
