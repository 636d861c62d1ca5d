"""The context cache: full KV blocks evicted from a worker's device pool live on in host memory, then
on disk, so the same prompt prefix costs no compute the next time (like DeepSeek's on-disk cache).

A block's bytes are stored under its chained block hash (which already names model, salt and
position in the prefix). ``ContextCache.fetch`` promotes a disk hit back to host memory.

Disk files are crash-safe: written to a temporary name, fsynced, renamed into place; each carries a
header with a magic, the format version, the block hash, the payload length and its SHA-256. A torn,
truncated or corrupted file fails the check, is deleted, and reads as a miss — never as KV. Files are
created 0600 and the folder 0700. The disk tier holds at most ``capacity`` block files, counting those
a previous process left (oldest use first out, by mtime, which a read refreshes); other files are
not counted and not touched, except temporary ones (``*.tmp*``) that a crash left, which are deleted.
``kvstore.disk_slot`` gives each worker a folder that survives its restarts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from .hashing import BlockHash

log = logging.getLogger(__name__)

TierName = Literal["host", "disk"]
TierEvent = Callable[[str, TierName, BlockHash], None]  # ("stored" | "removed", tier, hash)

_MAGIC = b"DSAKV\x00"
_FORMAT = 1
_HEADER = struct.Struct("<6sH32sQ32s")  # magic, format, block hash, payload bytes, payload sha256


class HostTier:
    """LRU map block hash → block bytes (uint8 [bytes_per_block]) bounded by ``capacity`` blocks."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[BlockHash, torch.Tensor] = OrderedDict()

    def __contains__(self, h: BlockHash) -> bool:
        return h in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, h: BlockHash) -> torch.Tensor | None:
        data = self._blocks.get(h)
        if data is not None:
            self._blocks.move_to_end(h)
        return data

    def put(self, h: BlockHash, data: torch.Tensor) -> list[tuple[BlockHash, torch.Tensor]]:
        """Insert; returns the entries pushed out (least recently used first)."""
        if self.capacity <= 0:
            return [(h, data)]
        self._blocks[h] = data
        self._blocks.move_to_end(h)
        out = []
        while len(self._blocks) > self.capacity:
            out.append(self._blocks.popitem(last=False))
        return out

    def pop(self, h: BlockHash) -> torch.Tensor | None:
        return self._blocks.pop(h, None)


class DiskTier:
    """Block files under ``root`` (one per hash), LRU-bounded by ``capacity`` blocks, files found at
    start included."""

    def __init__(self, root: str | Path, capacity: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            os.chmod(self.root, 0o700)
        except PermissionError:  # a folder another user made for us: keep its mode, still use it
            log.warning("context cache: cannot make %s private (mode 0700)", self.root)
        self.capacity = capacity
        self._lru: OrderedDict[BlockHash, None] = OrderedDict()
        for tmp in self.root.glob("*.tmp*"):  # torn writes of a crashed process
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
        found = []
        for path in self.root.glob("*.kv"):
            h = _block_hash(path.stem)
            try:
                st = path.stat()
            except OSError:
                continue
            if h is not None and stat.S_ISREG(st.st_mode):
                found.append((st.st_mtime_ns, h))
        for _, h in sorted(found):
            self._lru[h] = None
        self._evict()  # a previous process may have left more (or had a larger capacity)

    def _path(self, h: BlockHash) -> Path:
        return self.root / f"{h.hex()}.kv"

    def __contains__(self, h: BlockHash) -> bool:
        return h in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def put(self, h: BlockHash, data: torch.Tensor) -> list[BlockHash]:
        """Write atomically; returns the hashes evicted to stay within capacity."""
        payload = data.contiguous().numpy().tobytes()
        header = _HEADER.pack(_MAGIC, _FORMAT, h, len(payload), hashlib.sha256(payload).digest())
        tmp = self.root / f"{h.hex()}.tmp{os.getpid()}.{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with open(fd, "wb") as f:
                f.write(header)
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(h))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._lru[h] = None
        self._lru.move_to_end(h)
        return self._evict()

    def _evict(self) -> list[BlockHash]:
        """Delete the least recently used files beyond capacity; returns their hashes."""
        evicted = []
        while len(self._lru) > self.capacity:
            old, _ = self._lru.popitem(last=False)
            self._path(old).unlink(missing_ok=True)
            evicted.append(old)
        return evicted

    def get(self, h: BlockHash, nbytes: int) -> torch.Tensor | None:
        """The block's bytes, or None when absent, torn, corrupted or of the wrong size."""
        if h not in self._lru:
            return None
        path = self._path(h)
        try:
            raw = path.read_bytes()
            magic, fmt, stored_hash, length, digest = _HEADER.unpack_from(raw)
            payload = raw[_HEADER.size :]
            ok = (magic == _MAGIC and fmt == _FORMAT and stored_hash == h and length == nbytes == len(payload)
                  and hashlib.sha256(payload).digest() == digest)
        except (OSError, struct.error):
            ok = False
        if not ok:
            log.warning("context cache: dropping unreadable block file %s", path.name)
            self.remove(h)
            return None
        self._lru.move_to_end(h)
        try:
            os.utime(path)  # the LRU order survives a restart
        except OSError:
            pass
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8)

    def remove(self, h: BlockHash) -> None:
        self._lru.pop(h, None)
        self._path(h).unlink(missing_ok=True)


def _block_hash(stem: str) -> BlockHash | None:
    """The block hash a file stem names, or None for a name no block file has."""
    if len(stem) != 64:
        return None
    try:
        return bytes.fromhex(stem)
    except ValueError:
        return None


class ContextCache:
    """Host tier in front of an optional disk tier. ``on_event`` reports stored/removed per tier."""

    def __init__(self, bytes_per_block: int, host_blocks: int, disk_dir: str | Path | None = None,
                 disk_blocks: int = 0, on_event: TierEvent | None = None) -> None:
        self.bytes_per_block = bytes_per_block
        self.host = HostTier(host_blocks)
        self.disk = DiskTier(disk_dir, disk_blocks) if disk_dir is not None and disk_blocks > 0 else None
        self._on_event = on_event
        self.hits = {"host": 0, "disk": 0}

    def _event(self, kind: str, tier: TierName, h: BlockHash) -> None:
        if self._on_event is not None:
            self._on_event(kind, tier, h)

    def __contains__(self, h: BlockHash) -> bool:
        return h in self.host or (self.disk is not None and h in self.disk)

    def demote(self, h: BlockHash, data: torch.Tensor) -> None:
        """Keep an evicted device block; what the host tier pushes out goes to disk."""
        if h in self.host:
            return
        self._event("stored", "host", h)
        for old_h, old_data in self.host.put(h, data):
            if old_h != h or self.host.capacity <= 0:
                self._event("removed", "host", old_h)
            self._to_disk(old_h, old_data)

    def _to_disk(self, h: BlockHash, data: torch.Tensor) -> None:
        if self.disk is None or h in self.disk:
            return
        try:
            evicted = self.disk.put(h, data)
        except OSError as e:  # a full or read-only disk loses the block, never the request
            log.warning("context cache: cannot write block to disk: %s", e)
            return
        self._event("stored", "disk", h)
        for old in evicted:
            self._event("removed", "disk", old)

    def fetch(self, h: BlockHash) -> torch.Tensor | None:
        """The block's bytes from host (or disk, promoting it to host), or None."""
        data = self.host.get(h)
        if data is not None:
            self.hits["host"] += 1
            return data
        if self.disk is None:
            return None
        data = self.disk.get(h, self.bytes_per_block)
        if data is None:
            return None
        self.hits["disk"] += 1
        self.demote(h, data)
        return data

    def hashes(self) -> dict[TierName, list[BlockHash]]:
        """Everything held, per tier (to re-register with a restarted index)."""
        return {"host": list(self.host._blocks), "disk": list(self.disk._lru) if self.disk else []}
