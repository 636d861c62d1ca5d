"""BlockPool: KV block accounting (no tensors) with prefix reuse and LRU eviction.

A block is *in use* while its reference count is positive (running sequences, leased handles). A
free block may still hold a full, hashed block's KV: it stays findable by hash until it is reused,
and free blocks are reused least-recently-freed first (LRU). ``on_event`` reports hashes that
become findable ("stored") or stop being findable ("removed"), for the KV index.

Each block has a *generation* that grows whenever the block stops being in use (its last reference
is dropped, or the pool is reset) and whenever it is handed out afresh. A reader that recorded
``generations(blocks)`` while it held them (a KV handle under a lease) can tell, by comparing
again, whether the blocks may since have been reused for other KV. The counters live in one int64
array at a fixed address (``generation``), so a holder can expose them to remote readers.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal

from .hashing import BlockHash

BlockEvent = Literal["stored", "removed"]


class BlockPool:
    """Reference-counted blocks ``0 .. num_blocks-1``."""

    def __init__(
        self,
        num_blocks: int,
        on_event: Callable[[BlockEvent, BlockHash], None] | None = None,
        on_evict: Callable[[int, BlockHash], None] | None = None,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be ≥ 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self.hash_to_block: dict[BlockHash, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.generation = array("q", bytes(8 * num_blocks))  # never reallocated: its address is published
        self._on_event = on_event
        self._on_evict = on_evict  # called before a cached block's content is overwritten

    @property
    def num_free(self) -> int:
        """Blocks that ``allocate`` can hand out (free, cached or not)."""
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def lookup(self, hashes: Sequence[BlockHash]) -> list[int]:
        """Blocks holding the longest cached prefix of ``hashes`` (no references taken)."""
        out = []
        for h in hashes:
            block = self.hash_to_block.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def acquire_prefix(self, hashes: Sequence[BlockHash],
                       restore: Callable[[list[BlockHash]], list[int]] | None = None) -> list[int]:
        """Referenced blocks holding the longest cached prefix of ``hashes``: the pool's, then the ones
        ``restore`` loads from slower tiers (fresh, committed and referenced, for a prefix of the rest)."""
        blocks = self.lookup(hashes)
        self.acquire(blocks)
        if restore is not None and len(blocks) < len(hashes):
            blocks += restore(list(hashes[len(blocks) :]))
        return blocks

    def acquire(self, blocks: Sequence[int]) -> None:
        """Take a reference on each block (a prefix hit, or a second holder such as a lease)."""
        for b in blocks:
            if self.ref_count[b] == 0:
                del self._free[b]
            self.ref_count[b] += 1

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks with one reference each; evicts the least recently freed cached blocks."""
        if n > len(self._free):
            raise MemoryError(f"need {n} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None and self._on_evict is not None and self.hash_to_block.get(h) == b:
                self._on_evict(b, h)
            self._forget(b)
            self.ref_count[b] = 1
            self.generation[b] += 1
            out.append(b)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference from each block. Pass a sequence's blocks in order: they are freed
        tail first, so a later eviction takes a prompt's last blocks before its shared prefix."""
        for b in reversed(blocks):
            if self.ref_count[b] <= 0:
                raise RuntimeError(f"block {b} released more often than acquired")
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self._free[b] = None
                self.generation[b] += 1

    def generations(self, blocks: Sequence[int]) -> tuple[int, ...]:
        """The current generation of each block (see the module docstring)."""
        return tuple(self.generation[b] for b in blocks)

    def reset(self) -> None:
        """Every block free and uncached, as after construction (an engine restarting after a crash
        trusts none of what it held); generations keep growing, so old handles stay refused."""
        for b in range(self.num_blocks):
            self._forget(b)
            self.generation[b] += 1
        self.ref_count = [0] * self.num_blocks
        self._free = OrderedDict((b, None) for b in range(self.num_blocks))

    def commit(self, block: int, block_hash: BlockHash) -> None:
        """Mark ``block`` as holding the full block ``block_hash`` (findable by later requests)."""
        if self.block_hash[block] == block_hash:
            return
        self._forget(block)
        if block_hash in self.hash_to_block:
            return  # another block already holds the same content; keep that one findable
        self.block_hash[block] = block_hash
        self.hash_to_block[block_hash] = block
        if self._on_event:
            self._on_event("stored", block_hash)

    def _forget(self, block: int) -> None:
        h = self.block_hash[block]
        if h is None:
            return
        self.block_hash[block] = None
        if self.hash_to_block.get(h) == block:
            del self.hash_to_block[h]
            if self._on_event:
                self._on_event("removed", h)

    def cached_hashes(self) -> list[BlockHash]:
        """Every findable hash (to re-register with a restarted index)."""
        return list(self.hash_to_block)
