"""Engine: model runner + paged KV + scheduler + sampler, in one of three roles.

- ``both``: runs whole requests.
- ``prefill``: runs the prompt, samples the first token, and hands the KV over as a ``KVHandle``;
  the blocks stay leased until ``release`` (or lease expiry).
- ``decode``: ``import_kv`` pulls a handle's blocks through a ``KVTransfer`` and continues decoding.
  It can still prefill: a preempted sequence is recomputed locally.

Any role with a holder can ``export_prefix`` blocks it holds, and any role with a transfer can start a
request from a peer's exported prefix (``add_request(..., prefix=handle)``): see ``workers.engine.peer``.

Thread model: ``add_request``/``import_kv``/``abort``/``release`` may be called from any thread; they
queue commands that ``step()`` applies on the engine's own thread, so scheduling state has one owner.

Failures: one request's failure stays that request's (see ``step``). What ``step`` raises means the
engine as a whole is broken: its caller ends every request (``fail_all``) and may start afresh
(``reset``), except after ``ExpertParallelError``, which no retry can cure.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import torch

from kvstore.block_pool import BlockEvent
from kvstore.handle import KVHandle, LayoutFingerprint
from kvstore.hashing import HASH_VERSION, BlockHash, first_block_extra, self_test
from kvstore.paged import BlockLayout, PagedKVStorage
from kvstore.tiers import TierEvent
from kvstore.transfer import KVHolder, KVTransfer, TransferError
from workers.model.model import DeepseekV32
from workers.parallel.group import ExpertParallelError

from . import kv_budget
from .config import EngineConfig, Role
from .kv_manager import KVCacheManager
from .leases import KVImport, KVImporter, LeaseTable
from .output import OutputProcessor, Sink
from .peer import PeerCache
from .runner import ModelRunner
from .sampler import make_generator
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence, SeqStatus
from .types import GenerateRequest, TokenLogprob, TransferStats, WorkerStats

log = logging.getLogger(__name__)


def error_message(error: BaseException) -> str:
    """What a request ended by ``error`` reports."""
    return f"engine error: {type(error).__name__}: {error}"


class Engine:
    """One model replica's serving loop. See the module docstring for roles and threading.

    Parts: ``kv`` (storage, pool, tiers, commits), ``scheduler``, ``runner`` (one forward per step),
    ``outputs`` (sinks and increments), ``leases`` (prefill side of a hand-off), ``importer`` (decode side).
    """

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
        on_shared_event: Callable[[str, BlockHash], None] | None = None,
    ) -> None:
        """``on_block_event``/``on_tier_event``: this worker's blocks for the KV index;
        ``on_shared_event``: blocks it wrote to or evicted from a shared disk cache folder."""
        self_test()
        mc = model.config
        self.model, self.config, self.role = model, config, role
        self.worker_id, self.model_id, self.transfer = worker_id, model_id, transfer
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        dtype = model.embed.weight.dtype
        mode = config.indexer_mode or ("exact" if dtype == torch.float32 else "fp8")
        model.configure(indexer=mode)
        layout = BlockLayout(
            num_layers=mc.num_hidden_layers, block_size=config.block_size, latent_dim=mc.latent_dim,
            latent_dtype=dtype, index_dim=mc.index_head_dim,
            index_dtype=torch.float8_e4m3fn if mode == "fp8" else torch.float32,
        )
        self.config = config = kv_budget.fit(config, layout, model.embed.weight.device)
        self.kv = KVCacheManager(layout, config, model.embed.weight.device, on_block_event=on_block_event,
                                 on_tier_event=on_tier_event, on_shared_event=on_shared_event)
        self.scheduler = Scheduler(config, self.kv.pool, restore=self.kv.restore)
        # A prefill-role engine never runs a decode step: no graphs to hold memory for.
        graphs = config.cuda_graph_max_batch if role != "prefill" else 0
        self.runner = ModelRunner(model, self.kv.storage, cuda_graph_max_batch=graphs, max_model_len=self.max_model_len)
        self.outputs = OutputProcessor(mc.eos_token_id, self.max_model_len)
        # The holder side of the KV transfer backend (prefill role): publishes where blocks live.
        self.holder = holder_factory(self.kv.storage) if holder_factory else None
        if self.holder is not None:
            self.holder.bind_pool(self.kv.pool)
        self.fingerprint = LayoutFingerprint(
            model_id=model_id, dtype=str(dtype).removeprefix("torch."), index_dtype=mode,
            block_size=config.block_size, hash_version=HASH_VERSION, num_layers=mc.num_hidden_layers,
            bytes_per_block=layout.bytes_per_block,
        )
        self.leases = LeaseTable(self.kv, config.lease_s, self.holder)
        self.importer = KVImporter(self.kv, self.fingerprint, transfer, worker_id,
                                   lambda r: self._capacity_error(len(r.prompt_token_ids), r.params.max_tokens))
        self.peers = PeerCache(self.kv, self.leases, transfer, worker_id, self.fingerprint)
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self.wake_event = threading.Event()  # an EngineLoop shares one across its engines
        self._seqs: dict[str, Sequence] = {}
        self._tokens_done = 0
        self.requests_total = 0
        self._started = time.monotonic()
        self._failed: str | None = None  # set by fail_all: the engine runs no more forwards
        self._fail_lock = threading.Lock()

    # Views kept for callers that inspect an engine's memory.
    @property
    def pool(self):
        return self.kv.pool

    @property
    def storage(self) -> PagedKVStorage:
        return self.kv.storage

    @property
    def layout(self) -> BlockLayout:
        return self.kv.layout

    @property
    def context_cache(self):
        return self.kv.context_cache

    # ------------------------------------------------------------------ any thread
    def add_request(self, request: GenerateRequest, sink: Sink, prefix: KVHandle | None = None) -> None:
        """Run ``request``; ``prefix``: a peer's exported blocks of its prompt, read before it is scheduled."""
        if not self._enqueue(("add", request, sink, prefix)):
            OutputProcessor.send(request.request_id, sink, OutputProcessor.error_output(request, self._failed))

    def export_prefix(self, request_id: str, hashes: list[BlockHash], first_block: int,
                      sink: Callable[[KVHandle | None], None]) -> None:
        """Lease the longest prefix of ``hashes`` held here for a peer: ``sink`` gets the handle, or None
        when none of it is held (or the engine has failed). Released by ``release(export_id)``."""
        if not self._enqueue(("export", request_id, hashes, first_block, sink)):
            sink(None)

    def import_kv(self, request: GenerateRequest, handle: KVHandle, sink: Sink, on_read: Callable[[Exception | None], None]) -> None:
        imp = KVImport(request, handle, sink, on_read)
        if not self._enqueue(("import", imp)):
            imp.notify(TransferError(self._failed))

    def abort(self, request_id: str) -> None:
        self._enqueue(("abort", request_id))

    def release(self, request_id: str) -> None:
        """Drop the lease on a handed-off request's blocks (the decode worker has read them)."""
        self._enqueue(("release", request_id))

    def _enqueue(self, cmd: tuple) -> bool:
        with self._fail_lock:
            if self._failed is not None:
                return False
            self._inbox.put(cmd)
        self.wake_event.set()
        return True

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
                OutputProcessor.send(cmd[1].request_id, cmd[2], OutputProcessor.error_output(cmd[1], message))
            elif cmd[0] == "import":
                self.importer.pending.append(cmd[1])
            elif cmd[0] == "export":
                cmd[4](None)
        self.importer.fail_all(message)
        for seq in list(self._seqs.values()):
            self.outputs.emit(seq, "error", message)
            try:
                self._finish(seq)
            except Exception:  # the state may be what broke the engine; every caller still hears
                log.exception("freeing %s after the engine failed", seq.request_id)

    def reset(self) -> None:
        """After ``fail_all``, on the engine thread: back to an empty engine — every block free and
        uncached, no sequences, leases or imports — that accepts requests again."""
        self.scheduler.clear()
        self.leases.clear()
        self.importer.fail_all("engine reset")  # none left after fail_all; never leave a caller waiting
        self.outputs.sinks.clear()
        self._seqs.clear()
        self.kv.pool.reset()
        with self._fail_lock:
            self._failed = None

    def stats(self) -> WorkerStats:
        """Load and KV transfer counters; read racily from other threads. ``healthy`` stays True: the
        serving process knows whether this engine's loop still runs."""
        elapsed = max(1e-9, time.monotonic() - self._started)
        # A prefill worker reports its holder side (hand-offs), others their reader side (imports).
        side = self.holder if self.role == "prefill" and self.holder is not None else self.transfer or self.holder
        kv = TransferStats.from_json(side.stats()) if hasattr(side, "stats") else TransferStats(getattr(side, "name", "none"))
        return WorkerStats(
            worker_id=self.worker_id, role=self.role, waiting=len(self.scheduler.waiting) + len(self.importer),
            running=len(self.scheduler.running), free_blocks=self.kv.pool.num_free,
            total_blocks=self.config.num_blocks, tokens_per_s=round(self._tokens_done / elapsed, 2),
            requests_total=self.requests_total, queued_tokens=self.queued_prefill_tokens(), kv_transfer=kv,
            weight_bytes=self.runner.weight_bytes, kv_bytes_per_token=self.kv.layout.bytes_per_token,
            context_cache_hits=dict(self.kv.context_cache.hits) if self.kv.context_cache is not None else {},
            peer_pulls=self.peers.stats(), step_tokens=self.config.max_num_batched_tokens,
            disk_volume=self.kv.shared_disk.volume_id if self.kv.shared_disk is not None else None,
        )

    def queued_prefill_tokens(self) -> int:
        """Prompt tokens still to prefill (waiting and running); read racily from other threads."""
        seqs = list(self.scheduler.waiting) + list(self.scheduler.running)
        return sum(s.num_pending for s in seqs if s.num_pending > 1)

    def block_snapshot(self) -> dict[str, list[BlockHash]]:
        """Every block hash this engine can serve, per tier (for re-registering with an index)."""
        return self.kv.snapshot()

    # ------------------------------------------------------------------ engine thread
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self.importer.pending
                    or len(self.leases) or not self._inbox.empty())

    def step(self) -> bool:
        """Apply queued commands, run one scheduled batch, emit outputs. True if a forward ran.

        A command that raises ends its own request. A batch whose forward or sampling raises runs
        again one sequence at a time, each alone in its forward: the sequences that fail alone end
        with an ``error`` output (``error_message``) and free their blocks, the others go on with
        the tokens an undisturbed run gives. ``ExpertParallelError`` and failures outside any one
        request propagate (see the module docstring)."""
        self._drain_inbox()
        self.leases.expire()
        self._start_imported()
        out = self.scheduler.schedule()
        if out:
            now = time.monotonic()
            for seq in [*out.decodes, *(s for s, _ in out.prefills)]:
                if seq.queue_s is None and seq.num_output_tokens == 0:  # first scheduling of a prompt
                    seq.queue_s = now - seq.arrival
            self._run(out)
        return bool(out)

    def _run(self, out: SchedulerOutput) -> None:
        work = [(seq, 1) for seq in out.decodes] + out.prefills
        rngs = [(seq.generator, seq.generator.get_state()) for seq, _ in work if seq.generator is not None]
        try:
            result = self.runner.run_and_sample(work, len(out.decodes))
        except ExpertParallelError:
            raise
        except Exception as e:
            log.warning("a step of %d sequences failed (%s); running them one at a time", len(work), error_message(e))
            for generator, state in rngs:  # each retry draws what the batch would have drawn
                generator.set_state(state)
            for i, entry in enumerate(work):
                self._run_alone(entry, decode=i < len(out.decodes))
            return
        self._advance(work, *result)

    def _run_alone(self, entry: tuple[Sequence, int], decode: bool) -> None:
        try:
            result = self.runner.run_and_sample([entry], 1 if decode else 0)
        except ExpertParallelError:
            raise
        except Exception as e:
            self._fail(entry[0], e)
            return
        self._advance([entry], *result)

    def _advance(self, work: list[tuple[Sequence, int]], sampled: list[bool], tokens: list[int],
                 logprobs: list[TokenLogprob | None]) -> None:
        """Count a successful forward's KV (``run_and_sample`` changed no sequence) and hand out its
        tokens; a sequence that fails here fails alone."""
        picks = iter(zip(tokens, logprobs))
        for (seq, n), s in zip(work, sampled):
            seq.num_computed_tokens += n
            self._tokens_done += n
            pick = next(picks) if s else None
            try:
                self.kv.commit(seq)
                if pick is not None:
                    self._on_token(seq, *pick)
            except ExpertParallelError:
                raise
            except Exception as e:
                self._fail(seq, e)

    def _fail(self, seq: Sequence, error: Exception) -> None:
        """End ``seq`` alone with an ``error`` output and free its blocks."""
        log.error("request %s failed: %s", seq.request_id, error_message(error), exc_info=error)
        self.outputs.emit(seq, "error", error_message(error))
        self._finish(seq)

    def _on_token(self, seq: Sequence, token: int, logprob) -> None:
        reason = self.outputs.append(seq, token, logprob)
        if seq.handoff and seq.num_output_tokens == 1:
            self._hand_off(seq)
            return
        delivered = self.outputs.emit(seq, reason)
        if reason is not None or not delivered:
            self._finish(seq)  # finished, or nobody is listening any more: free its blocks now

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self.scheduler.release_held(seq)
        self.kv.free(seq)
        seq.status = SeqStatus.FINISHED
        self._seqs.pop(seq.request_id, None)
        self.outputs.unregister(seq.request_id)

    def _hand_off(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        seq.status = SeqStatus.LEASED
        handle = self.leases.hand_off(seq, self.worker_id, self.fingerprint)
        sink = self.outputs.unregister(seq.request_id)
        self._seqs.pop(seq.request_id, None)
        if sink is None or not OutputProcessor.send(seq.request_id, sink, handle):
            self.leases.release(seq.request_id)

    def _drain_inbox(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                self._apply(cmd)
            except ExpertParallelError:
                raise
            except Exception as e:
                self._command_failed(cmd, e)

    def _apply(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            self._add(cmd[1], cmd[2], cmd[3])
        elif kind == "export":
            self.peers.serve_export(*cmd[1:])
        elif kind == "import":
            self.requests_total += 1
            self.importer.pending.append(cmd[1])
        elif kind == "abort":
            self._abort(cmd[1])
        elif kind == "release":
            self.leases.release(cmd[1])

    def _command_failed(self, cmd: tuple, error: Exception) -> None:
        """End the request a failed command was about; the engine's other requests go on."""
        kind, arg = cmd[0], cmd[1]
        if kind == "export":  # nothing was leased; the peer computes the prefix itself
            log.error("export of %s's prefix failed: %s", arg, error_message(error), exc_info=error)
            cmd[4](None)
            return
        rid = arg.request_id if kind == "add" else arg.request.request_id if kind == "import" else arg
        seq = self._seqs.get(rid)
        if seq is not None and (kind != "add" or self.outputs.sinks.get(rid) is cmd[2]):
            self._fail(seq, error)
            return
        log.error("%s of request %s failed: %s", kind, rid, error_message(error), exc_info=error)
        if kind == "add":
            OutputProcessor.send(rid, cmd[2], OutputProcessor.error_output(arg, error_message(error)))
        elif kind == "import":
            self.importer.drop(rid)
            arg.notify(TransferError(error_message(error)))

    def _add(self, request: GenerateRequest, sink: Sink, prefix: KVHandle | None = None) -> None:
        self.requests_total += 1
        error = self._capacity_error(len(request.prompt_token_ids), request.params.max_tokens)
        if error:
            OutputProcessor.send(request.request_id, sink, OutputProcessor.error_output(request, error))
            return
        seq = self._new_sequence(request, list(request.prompt_token_ids))
        seq.handoff = self.role == "prefill"
        self.outputs.register(request.request_id, sink)
        self._seqs[request.request_id] = seq
        if prefix is not None:
            self.peers.pull(seq, prefix)
        self.scheduler.add(seq)

    def _new_sequence(self, request: GenerateRequest, token_ids: list[int]) -> Sequence:
        return Sequence(
            request=request, token_ids=token_ids, prompt_len=len(request.prompt_token_ids),
            extra=first_block_extra(self.model_id, request.cache_salt),
            generator=make_generator(request.params, self.runner.device),
        )

    def _capacity_error(self, prompt_len: int, max_tokens: int) -> str | None:
        if prompt_len + (1 if self.role == "prefill" else max_tokens) > self.max_model_len:
            return f"prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds max_model_len ({self.max_model_len})"
        need = -(-min(prompt_len + max_tokens, self.max_model_len) // self.config.block_size)
        if need > self.config.num_blocks:
            return f"request needs {need} KV blocks; this worker has {self.config.num_blocks}"
        return None

    def _abort(self, request_id: str) -> None:
        self.leases.release(request_id)
        self.importer.drop(request_id)
        seq = self._seqs.get(request_id)
        if seq is not None:
            self._finish(seq)

    def _start_imported(self) -> None:
        """Turn every import whose blocks arrived into a running sequence."""
        for imp, blocks in self.importer.poll():
            request, handle = imp.request, imp.handle
            seq = self._new_sequence(request, list(request.prompt_token_ids) + [handle.first_token])
            seq.block_table, seq.num_computed_tokens = blocks, handle.num_tokens
            seq.num_cached_tokens, seq.emitted, seq.admitted_once = handle.cached_tokens, 1, True
            seq.first_token_time = time.monotonic()
            if handle.first_logprob is not None:
                seq.logprobs.append(handle.first_logprob)
            try:
                self.kv.commit(seq)
            except Exception as e:  # as a failed read: the caller recomputes
                self.kv.free(seq)
                imp.notify(TransferError(error_message(e)))
                continue
            self._seqs[request.request_id] = seq
            self.outputs.register(request.request_id, imp.sink)
            self.scheduler.add_running(seq)
            imp.notify(None)
