"""SharedDiskTier: one folder of context-cache block files shared by every worker process that mounts
it — several processes on a node, or several nodes over a ReadWriteMany volume.

Files are those of the private disk tier (``kvstore.tiers``: header with magic, format, block hash,
payload length and SHA-256; temp file, fsync, rename), so a reader never takes a torn or foreign
write for KV. A block hash names its bytes, so two processes writing the same hash write the same
file and either copy serves. No process keeps an authoritative list: the folder is the truth, and
membership is a file lookup.

The folder is named by ``volume_id``, a random id in ``<root>/volume.id`` that the first process to
open the folder creates (``os.link`` of a finished temp file: exactly one creator wins, nobody reads a
half-written id). An index publishes the folder's blocks under that id rather than under a worker.

Bound: at most ``capacity_blocks`` block files, oldest use first out (by mtime, which a read
refreshes). Counting the folder on every put would cost a directory scan per block, so each process
keeps an estimate — the count of its last scan plus its own writes since — and sweeps when the
estimate passes capacity, or after ``slack`` writes of its own (whichever comes first, so other
processes' writes are noticed too). A sweep, under a non-blocking ``flock`` of ``<root>/sweep.lock``
(another process sweeping means this one skips), rescans and deletes the oldest files down to the
low-water mark ``capacity - slack`` (90 % of capacity), so the next sweep is ``slack`` writes away.
Hence after each ``put`` of a lone writer the folder holds at most ``capacity`` files; with several
writers each may add up to ``slack`` between sweeps (``slack`` is 1 below 20 blocks). The lock only
saves work: where ``flock`` is not coherent across nodes, two sweeps at once delete a little more.

Sweeps also delete temp files (``*.tmp*``) untouched for ``STALE_TMP_S`` — writes a crash abandoned.
Never at open: a writer in another process may own a fresh one. All processes must run as one user
(files are 0600, the folder 0700).
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import threading
import time
from pathlib import Path

import torch

from .hashing import BlockHash
from .tiers import (
    block_file_hash, block_file_path, make_private_dir, read_block_file, scan_block_files, write_block_file,
)

log = logging.getLogger(__name__)

VOLUME_ID_NAME = "volume.id"
SWEEP_LOCK_NAME = "sweep.lock"
STALE_TMP_S = 60.0
_LOW_WATER = 0.9


class SharedDiskTier:
    """Block files under ``root`` shared across processes, bounded by ``capacity_blocks`` in total."""

    def __init__(self, root: str | Path, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"shared disk tier capacity_blocks must be ≥ 1, got {capacity_blocks}")
        self.root = make_private_dir(root)
        self.capacity = capacity_blocks
        self.slack = max(1, capacity_blocks - int(capacity_blocks * _LOW_WATER))
        self.volume_id = _volume_id(self.root)
        self._lock = threading.Lock()  # guards the estimate; the files need no lock
        self._estimate = len(self.hashes())
        self._writes_since_scan = 0

    def _path(self, h: BlockHash) -> Path:
        return block_file_path(self.root, h)

    def __contains__(self, h: BlockHash) -> bool:
        return self._path(h).exists()

    def hashes(self) -> list[BlockHash]:
        """Every block file in the folder now, whoever wrote it."""
        with os.scandir(self.root) as entries:
            return [h for h in (block_file_hash(e.name) for e in entries) if h is not None]

    def put(self, h: BlockHash, data: torch.Tensor) -> list[BlockHash]:
        """Write the block (uint8 [nbytes]) unless its file exists; returns the hashes this call
        evicted. A full or read-only disk loses the block (logged), returns [] and never raises."""
        path = self._path(h)
        if path.exists() or not write_block_file(path, h, data):
            return []
        with self._lock:
            self._estimate += 1
            self._writes_since_scan += 1
            due = self._estimate > self.capacity or self._writes_since_scan >= self.slack
        return self._sweep() if due else []

    def get(self, h: BlockHash, nbytes: int) -> torch.Tensor | None:
        """The block's bytes (uint8 [nbytes]) from any process's file, or None when absent, torn,
        corrupted or of the wrong size (such a file is deleted). A hit refreshes its age."""
        return read_block_file(self._path(h), h, nbytes)

    def remove(self, h: BlockHash) -> None:
        try:
            self._path(h).unlink()
        except FileNotFoundError:
            return
        with self._lock:
            self._estimate -= 1

    def _sweep(self) -> list[BlockHash]:
        """Rescan; over capacity, delete the oldest files down to the low-water mark and return
        their hashes. Skipped (returns []) while another process or thread sweeps."""
        try:
            fd = os.open(self.root / SWEEP_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            log.warning("shared context cache: cannot open the sweep lock: %s", e)
            return []
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held by another sweeper (or unsupported here): it will do the work
                return []
            self._delete_stale_temps()
            found = scan_block_files(self.root)
            evicted: list[BlockHash] = []
            if len(found) > self.capacity:
                for _, h in found[: len(found) - (self.capacity - self.slack)]:
                    try:
                        self._path(h).unlink()
                    except FileNotFoundError:  # another sweeper's (a node flock does not reach)
                        continue
                    except OSError as e:
                        log.warning("shared context cache: cannot evict %s: %s", h.hex(), e)
                        continue
                    evicted.append(h)
            with self._lock:
                self._estimate = len(found) - len(evicted)
                self._writes_since_scan = 0
            return evicted
        finally:
            os.close(fd)  # drops the flock

    def _delete_stale_temps(self) -> None:
        cutoff = time.time() - STALE_TMP_S
        for tmp in self.root.glob("*.tmp*"):
            try:
                if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except OSError:  # gone meanwhile: renamed into place, or another sweeper's
                continue


def _volume_id(root: Path) -> str:
    """The folder's id, created by whichever process links ``volume.id`` first."""
    path = root / VOLUME_ID_NAME
    try:
        return _read_volume_id(path)
    except FileNotFoundError:
        pass
    tmp = root / f"{VOLUME_ID_NAME}.tmp{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with open(fd, "w") as f:
            f.write(secrets.token_hex(8) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process won: then its id is the folder's
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read_volume_id(path)


def _read_volume_id(path: Path) -> str:
    text = path.read_text().strip()
    try:
        bytes.fromhex(text)
    except ValueError:
        text = ""
    if not text:
        raise RuntimeError(f"shared context cache: {path} holds no volume id; delete it to mint a new one")
    return text
