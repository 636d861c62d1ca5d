"""KVCacheManager: the engine's KV memory — paged storage, block pool, context-cache tiers, commits.

The scheduler asks the pool for blocks; this class owns what is behind them: the bytes
(``PagedKVStorage``), demotion of evicted full blocks to the host/disk/shared tiers and their restore, and
committing a sequence's full blocks under their chained hashes so later prompts can reuse them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvstore.block_pool import BlockEvent, BlockPool
from kvstore.hashing import BlockHash
from kvstore.paged import BlockLayout, PagedKVStorage
from kvstore.shared_disk import SharedDiskTier
from kvstore.tiers import ContextCache, SharedEvent, TierEvent

from .config import EngineConfig
from .sequence import Sequence


class KVCacheManager:
    """Storage + pool + tiers of one engine. Runs on the engine thread (``snapshot`` excepted)."""

    def __init__(
        self,
        layout: BlockLayout,
        config: EngineConfig,
        device: torch.device | str,
        *,
        on_block_event: Callable[[BlockEvent, BlockHash], None] | None = None,
        on_tier_event: TierEvent | None = None,
        on_shared_event: SharedEvent | None = None,
    ) -> None:
        self.layout, self.block_size = layout, config.block_size
        self.storage = PagedKVStorage(layout, config.num_blocks, device=device)
        self.shared_disk: SharedDiskTier | None = None
        if config.shared_disk_dir and config.shared_disk_blocks > 0:
            self.shared_disk = SharedDiskTier(config.shared_disk_dir, config.shared_disk_blocks)
        self.context_cache: ContextCache | None = None
        if (config.host_cache_blocks > 0 or (config.disk_cache_dir and config.disk_cache_blocks > 0)
                or self.shared_disk is not None):
            self.context_cache = ContextCache(
                layout.bytes_per_block, config.host_cache_blocks, config.disk_cache_dir,
                config.disk_cache_blocks, on_event=on_tier_event,
                shared=self.shared_disk, on_shared_event=on_shared_event,
            )
        self.pool = BlockPool(config.num_blocks, on_event=on_block_event,
                              on_evict=self._demote if self.context_cache else None)

    @property
    def restore(self) -> Callable[[list[BlockHash]], list[int]] | None:
        """The scheduler's hook to load a prefix from the tiers (None when there are no tiers)."""
        return self._restore if self.context_cache is not None else None

    def commit(self, seq: Sequence) -> None:
        """Publish ``seq``'s newly filled blocks under their hashes (prefix reuse from now on)."""
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        if full > seq.committed_blocks:
            hashes = seq.full_block_hashes(bs, full * bs)
            for i in range(seq.committed_blocks, full):
                self.pool.commit(seq.block_table[i], hashes[i])
            seq.committed_blocks = full

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references to its blocks (full committed ones stay cached)."""
        self.pool.release(seq.block_table)
        seq.block_table = []

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

    def snapshot(self) -> dict[str, list[BlockHash]]:
        """Every block hash this engine can serve, per tier (for re-registering with an index).
        Safe from other threads: retried when the engine thread changes the maps mid-copy."""
        for _ in range(10):
            try:
                out = {"device": list(self.pool.hash_to_block)}
                if self.context_cache is not None:
                    out.update(self.context_cache.hashes())
                return out
            except RuntimeError:
                continue
        return {"device": []}
