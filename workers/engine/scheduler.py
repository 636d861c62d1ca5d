"""Scheduler: picks each step's work within a token budget (continuous batching, chunked prefill).

Order each step: (1) running sequences that decode (one token each), (2) running sequences with an
unfinished prefill, continuing in chunks, (3) waiting sequences in admission order (below), each
starting from its longest cached prefix. When blocks run out for a running sequence, the most
recently admitted running sequence is preempted: its blocks are released (full ones stay cached)
and it goes back to the queue, ahead of every sequence not yet admitted, to be recomputed — never
a crash.

Admission order: lower ``GenerateRequest.priority`` first, first come first served within a
priority, with aging so that nothing starves. A sequence's effective priority is
``priority - waited_s / priority_aging_s``: every ``priority_aging_s`` seconds of waiting is worth
one priority level. Since every waiting sequence ages at the same rate, that order is the order of
``arrival + priority * priority_aging_s``, fixed at arrival: a request of priority ``p`` goes ahead
of any request of priority ``q`` that arrives more than ``(p - q) * priority_aging_s`` seconds
after it. The head of the queue is admitted first; while it cannot get blocks, nothing behind it is.

Shared prefixes in flight: a waiting sequence whose next uncached block is being computed right now
by a running sequence's prefill (the same prompt prefix, sent concurrently) is not admitted yet: it
keeps its place and starts once those blocks are committed, from them, instead of computing the same
prefix a second time. Sequences behind it go on meanwhile.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from kvstore.block_pool import BlockPool
from kvstore.hashing import BlockHash

from .config import EngineConfig
from .sequence import Sequence, SeqStatus


@dataclass
class SchedulerOutput:
    """One step's work: decodes run as one [B, 1] batch; each prefill chunk as [1, n]."""

    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens this step)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    """Owns the waiting queue (kept in admission order, see the module docstring) and the running
    set; block accounting through ``BlockPool``."""

    def __init__(self, config: EngineConfig, pool: BlockPool, restore: Callable[[list[BlockHash]], list[int]] | None = None) -> None:
        self.config = config
        self.pool = pool
        # Loads the next blocks of a prefix from the context cache (host/disk tiers) into fresh
        # blocks, committed and referenced; returns them (a prefix of the hashes given).
        self.restore = restore
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def _order(self, seq: Sequence) -> tuple[bool, float]:
        """Admission order key: preempted sequences first, then ``arrival + priority * aging``."""
        return not seq.admitted_once, seq.arrival + seq.request.priority * self.config.priority_aging_s

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        bisect.insort_right(self.waiting, seq, key=self._order)  # after equal keys: FIFO on ties

    def clear(self) -> None:
        """Forget every sequence (the engine is being reset; the pool is reset with it)."""
        self.waiting.clear()
        self.running.clear()

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose blocks are already allocated (an imported KV handle)."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished, aborted, or handed off); its blocks are the caller's."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        bs = self.config.block_size
        return -(-(seq.num_computed_tokens + n) // bs) - len(seq.block_table)

    def _grow(self, seq: Sequence, n: int) -> bool:
        need = self._blocks_needed(seq, n)
        if need <= 0:
            return True
        if not self.pool.can_allocate(need):
            return False
        seq.block_table.extend(self.pool.allocate(need))
        return True

    def _preempt(self, out: SchedulerOutput, protect: Sequence) -> bool:
        """Preempt the latest running sequence other than ``protect``; False if there is none."""
        for victim in reversed(self.running):
            if victim is protect or victim in out.decodes or any(victim is s for s, _ in out.prefills):
                continue
            self.running.remove(victim)
            self.pool.release(victim.block_table)
            victim.block_table = []
            victim.num_computed_tokens = 0
            victim.committed_blocks = 0
            self.add(victim)
            out.preempted.append(victim)
            self.num_preemptions += 1
            return True
        return False

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        computing = {h for seq in self.running for h in self._uncommitted_prompt(seq)}
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq not in self.running:  # preempted while making room for an earlier one
                continue
            n = min(seq.num_pending, budget)
            while not self._grow(seq, n):
                if not self._preempt(out, protect=seq):
                    break
            else:
                (out.decodes.append(seq) if seq.num_pending == 1 else out.prefills.append((seq, n)))
                budget -= n
                continue
            # Could not fit even alone: it waits for blocks (another sequence may finish first).
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[i]
            if not seq.block_table:
                self._take_prefix(seq)
            if self._next_block(seq) in computing:  # another sequence is computing it: wait for it
                self._untake_prefix(seq)
                i += 1
                continue
            n = min(seq.num_pending, budget)
            if not self._grow(seq, n):
                self._untake_prefix(seq)
                break
            self.waiting.pop(i)
            computing.update(self._uncommitted_prompt(seq))
            self.release_held(seq)  # its own references to the pulled blocks replace the holding ones
            seq.status = SeqStatus.RUNNING
            seq.admitted_once = True
            self.running.append(seq)
            (out.decodes.append(seq) if seq.num_pending == 1 else out.prefills.append((seq, n)))
            budget -= n
        return out

    def _prompt_hashes(self, seq: Sequence) -> list[BlockHash]:
        """Hashes of the full blocks a prefill of ``seq`` may take from the cache (never its last token)."""
        return seq.full_block_hashes(self.config.block_size, len(seq.token_ids) - 1)

    def _uncommitted_prompt(self, seq: Sequence) -> list[BlockHash]:
        """Cacheable blocks ``seq``'s unfinished prefill will compute and commit (none once it decodes)."""
        if seq.num_pending <= 1:
            return []
        return self._prompt_hashes(seq)[seq.committed_blocks :]

    def _next_block(self, seq: Sequence) -> BlockHash | None:
        """The hash of the first block ``seq`` has to compute, if it is a cacheable one."""
        hashes = self._prompt_hashes(seq)
        return hashes[len(seq.block_table)] if len(seq.block_table) < len(hashes) else None

    def _take_prefix(self, seq: Sequence) -> None:
        """Start ``seq`` from its longest cached prefix (at least one token is always computed)."""
        bs = self.config.block_size
        hashes = self._prompt_hashes(seq)
        hit = self.pool.acquire_prefix(hashes, self.restore)
        seq.block_table = hit
        seq.num_computed_tokens = len(hit) * bs
        seq.committed_blocks = len(hit)
        if not seq.admitted_once:
            seq.num_cached_tokens = min(seq.num_computed_tokens, seq.prompt_len)

    def release_held(self, seq: Sequence) -> None:
        """Drop the references that kept ``seq``'s pulled prefix blocks cached until its admission."""
        if seq.held_blocks:
            self.pool.release(seq.held_blocks)
            seq.held_blocks = []

    def _untake_prefix(self, seq: Sequence) -> None:
        self.pool.release(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.committed_blocks = 0
