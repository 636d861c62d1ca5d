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
``kvstore.disk_slot`` gives each worker a folder that survives its restarts. The same file format
serves ``kvstore.shared_disk.SharedDiskTier``, a folder shared by many workers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import stat
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from .hashing import BlockHash

if TYPE_CHECKING:
    from .shared_disk import SharedDiskTier

log = logging.getLogger(__name__)

TierName = Literal["host", "disk"]
TierEvent = Callable[[str, TierName, BlockHash], None]  # ("stored" | "removed", tier, hash)
SharedEvent = Callable[[str, BlockHash], None]  # ("stored" | "removed", hash) in the shared folder

_MAGIC = b"DSAKV\x00"
_FORMAT = 1
_HEADER = struct.Struct("<6sH32sQ32s")  # magic, format, block hash, payload bytes, payload sha256
# pid and thread ident repeat across the nodes that mount one shared folder; this tag does not.
_WRITER_TAG = secrets.token_hex(4)


def make_private_dir(root: str | Path) -> Path:
    """Create ``root`` (and its parents) 0700; a folder another user made keeps its mode (warned)."""
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.chmod(path, 0o700)
    except PermissionError:
        log.warning("context cache: cannot make %s private (mode 0700)", path)
    return path


def block_file_path(root: Path, h: BlockHash) -> Path:
    return root / f"{h.hex()}.kv"


def block_file_hash(name: str) -> BlockHash | None:
    """The block hash a file name ``<64 hex>.kv`` names, or None for a name no block file has."""
    stem, dot, ext = name.partition(".")
    if not dot or ext != "kv" or len(stem) != 64:
        return None
    try:
        return bytes.fromhex(stem)
    except ValueError:
        return None


def scan_block_files(root: Path) -> list[tuple[int, BlockHash]]:
    """(mtime_ns, hash) of every regular block file under ``root``, least recently used first."""
    found = []
    with os.scandir(root) as entries:
        for entry in entries:
            h = block_file_hash(entry.name)
            if h is None:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:  # deleted meanwhile
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((st.st_mtime_ns, h))
    found.sort()
    return found


def write_block_file(path: Path, h: BlockHash, data: torch.Tensor) -> bool:
    """Write ``data`` (uint8 [nbytes]) as the block file ``path`` atomically: temp file, fsync, rename.

    Returns False, with a warning, when the disk refuses (full, read-only): that loses the block,
    never the request. The temp name is unique per node, process and thread.
    """
    payload = data.contiguous().numpy().tobytes()
    header = _HEADER.pack(_MAGIC, _FORMAT, h, len(payload), hashlib.sha256(payload).digest())
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.{threading.get_ident()}.{_WRITER_TAG}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with open(fd, "wb") as f:
                f.write(header)
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        log.warning("context cache: cannot write block file %s: %s", path.name, e)
        return False
    return True


def read_block_file(path: Path, h: BlockHash, nbytes: int) -> torch.Tensor | None:
    """The payload (uint8 [nbytes]) of block file ``path`` if its header vouches for it, else None.

    A hit refreshes the file's mtime (the LRU order, across restarts and processes). A torn,
    corrupted or wrong-size file is deleted — unless a writer has renamed a new file into place since
    it was opened.
    """
    opened: os.stat_result | None = None
    try:
        with open(path, "rb") as f:
            opened = os.fstat(f.fileno())
            raw = f.read()
            magic, fmt, stored_hash, length, digest = _HEADER.unpack_from(raw)
            payload = raw[_HEADER.size :]
            ok = (magic == _MAGIC and fmt == _FORMAT and stored_hash == h and length == nbytes == len(payload)
                  and hashlib.sha256(payload).digest() == digest)
            if ok:
                try:
                    os.utime(f.fileno())
                except OSError:
                    pass
    except FileNotFoundError:
        return None
    except (OSError, struct.error):
        ok = False
    if ok:
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    log.warning("context cache: dropping unreadable block file %s", path.name)
    try:
        now = os.stat(path)
        if opened is None or (now.st_ino, now.st_dev) == (opened.st_ino, opened.st_dev):
            path.unlink()
    except OSError:
        pass
    return None


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
    start included. One process owns the folder."""

    def __init__(self, root: str | Path, capacity: int) -> None:
        self.root = make_private_dir(root)
        self.capacity = capacity
        self._lru: OrderedDict[BlockHash, None] = OrderedDict()
        for tmp in self.root.glob("*.tmp*"):  # torn writes of a crashed process
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
        for _, h in scan_block_files(self.root):
            self._lru[h] = None
        self._evict()  # a previous process may have left more (or had a larger capacity)

    def _path(self, h: BlockHash) -> Path:
        return block_file_path(self.root, h)

    def __contains__(self, h: BlockHash) -> bool:
        return h in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def put(self, h: BlockHash, data: torch.Tensor) -> list[BlockHash]:
        """Write atomically; returns the hashes evicted to stay within capacity. A write the disk
        refuses is logged and leaves ``h`` absent."""
        if not write_block_file(self._path(h), h, data):
            return []
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
        data = read_block_file(self._path(h), h, nbytes)
        if data is None:
            self._lru.pop(h, None)
            return None
        self._lru.move_to_end(h)
        return data

    def remove(self, h: BlockHash) -> None:
        self._lru.pop(h, None)
        self._path(h).unlink(missing_ok=True)


class ContextCache:
    """Host tier in front of an optional private disk tier and an optional shared disk tier.

    What the host tier pushes out goes to each disk tier configured; ``fetch`` looks in host, then
    disk, then shared, and promotes a disk or shared hit to host. ``on_event`` reports stored/removed
    per private tier (the worker's own blocks); ``on_shared_event`` reports the blocks this process
    wrote to or evicted from the shared folder (published under the folder's ``volume_id``).
    """

    def __init__(self, bytes_per_block: int, host_blocks: int, disk_dir: str | Path | None = None,
                 disk_blocks: int = 0, on_event: TierEvent | None = None, *,
                 shared: SharedDiskTier | None = None, on_shared_event: SharedEvent | None = None) -> None:
        self.bytes_per_block = bytes_per_block
        self.host = HostTier(host_blocks)
        self.disk = DiskTier(disk_dir, disk_blocks) if disk_dir is not None and disk_blocks > 0 else None
        self.shared = shared
        self._on_event = on_event
        self._on_shared_event = on_shared_event
        self.hits = {"host": 0, "disk": 0, "shared": 0}

    def _event(self, kind: str, tier: TierName, h: BlockHash) -> None:
        if self._on_event is not None:
            self._on_event(kind, tier, h)

    def _shared_event(self, kind: str, h: BlockHash) -> None:
        if self._on_shared_event is not None:
            self._on_shared_event(kind, h)

    def __contains__(self, h: BlockHash) -> bool:
        return (h in self.host or (self.disk is not None and h in self.disk)
                or (self.shared is not None and h in self.shared))

    def demote(self, h: BlockHash, data: torch.Tensor) -> None:
        """Keep an evicted device block; what the host tier pushes out goes to the disk tiers."""
        if h in self.host:
            return
        self._event("stored", "host", h)
        for old_h, old_data in self.host.put(h, data):
            if old_h != h or self.host.capacity <= 0:
                self._event("removed", "host", old_h)
            self._to_disk(old_h, old_data)
            self._to_shared(old_h, old_data)

    def _to_disk(self, h: BlockHash, data: torch.Tensor) -> None:
        if self.disk is None or h in self.disk:
            return
        evicted = self.disk.put(h, data)
        if h in self.disk:  # else the disk refused it (logged by the write)
            self._event("stored", "disk", h)
        for old in evicted:
            self._event("removed", "disk", old)

    def _to_shared(self, h: BlockHash, data: torch.Tensor) -> None:
        if self.shared is None or h in self.shared:  # already there: its writer published it
            return
        evicted = self.shared.put(h, data)
        # A concurrent writer of the same hash makes this a duplicate "stored": harmless to an index.
        if h in evicted or h in self.shared:
            self._shared_event("stored", h)
        for old in evicted:
            self._shared_event("removed", old)

    def fetch(self, h: BlockHash) -> torch.Tensor | None:
        """The block's bytes from host (or disk, or shared, promoting it to host), or None."""
        data = self.host.get(h)
        if data is not None:
            self.hits["host"] += 1
            return data
        for tier, store in (("disk", self.disk), ("shared", self.shared)):
            if store is None:
                continue
            data = store.get(h, self.bytes_per_block)
            if data is not None:
                self.hits[tier] += 1
                self.demote(h, data)
                return data
        return None

    def hashes(self) -> dict[TierName, list[BlockHash]]:
        """This worker's own blocks, per tier (to re-register with a restarted index). The shared
        folder's are not among them: they belong to the volume (``shared.hashes()``)."""
        return {"host": list(self.host._blocks), "disk": list(self.disk._lru) if self.disk else []}
