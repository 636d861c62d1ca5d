"""Stable disk-cache folders per worker slot, so a restarted worker finds the blocks its predecessor
wrote instead of abandoning them (and the disk filling with orphaned folders).

A worker of role ``prefill`` claims ``<root>/prefill-<n>`` for the lowest ``n`` whose lock file
``<root>/prefill-<n>/slot.lock`` it can ``flock``. The kernel drops the lock when the process exits,
however it exits, so the next worker to start takes over a dead worker's folder; two live workers
never share one. ``flock`` is per host (and unreliable on some network filesystems): give the workers
of each host a local ``root``.

Folders are created 0700 and lock files 0600: cached KV is as private as the prompts it encodes.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "slot.lock"


class DiskSlot:
    """A claimed slot folder; the claim lasts until ``release()`` or the end of the process."""

    def __init__(self, path: Path, number: int, fd: int) -> None:
        self.path, self.number = path, number
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor of the open file drops the flock
            self._fd = None

    def __del__(self) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"DiskSlot({str(self.path)!r})"


def claim_disk_slot(root: str | Path, role: str, *, max_slots: int = 4096) -> DiskSlot:
    """Claim ``<root>/<role>-<n>`` for the lowest free ``n`` (creating it, mode 0700).

    Raises:
        OSError: ``root`` cannot be created or written, or all ``max_slots`` slots are taken.
    """
    if not role or "/" in role or role.startswith("."):
        raise ValueError(f"role must be a plain folder-name prefix, got {role!r}")
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    for n in range(max_slots):
        folder = base / f"{role}-{n}"
        folder.mkdir(exist_ok=True, mode=0o700)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if isinstance(e, BlockingIOError):  # a live worker holds it
                continue
            raise
        try:
            os.chmod(folder, 0o700)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())  # for whoever looks; the lock is what counts
        except BaseException:
            os.close(fd)
            raise
        return DiskSlot(folder, n, fd)
    raise OSError(f"all {max_slots} disk-cache slots for {role!r} under {base} are taken")
