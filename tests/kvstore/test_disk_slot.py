"""Disk-cache folders per worker slot: exclusive while a worker lives, taken over with their blocks
when it dies; block files private; the disk tier's bound holds across restarts."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvstore.disk_slot import LOCK_NAME, claim_disk_slot
from kvstore.tiers import ContextCache, DiskTier

ROOT = Path(__file__).resolve().parents[2]
NBYTES = 256


def _block(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (NBYTES,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _h(i: int) -> bytes:
    return bytes([i]) * 32


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _block_files(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.kv") if p.is_file() and len(p.stem) == 64}


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Modes must come from the code, not from a careful umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_the_lowest_free_slot_is_claimed_and_held_exclusively(tmp_path):
    a, b = claim_disk_slot(tmp_path, "prefill"), claim_disk_slot(tmp_path, "prefill")
    d = claim_disk_slot(tmp_path, "decode")
    assert (a.path.name, b.path.name, d.path.name) == ("prefill-0", "prefill-1", "decode-0")
    a.release()
    c = claim_disk_slot(tmp_path, "prefill")
    assert c.path == tmp_path / "prefill-0"  # freed: the next worker takes it
    assert claim_disk_slot(tmp_path, "prefill").path.name == "prefill-2"  # b still holds 1
    for slot in (b, c, d):
        slot.release()


_CHILD = """
import sys, torch
from kvstore.disk_slot import claim_disk_slot
from kvstore.tiers import DiskTier
slot = claim_disk_slot(sys.argv[1], "prefill")
disk = DiskTier(slot.path, 8)
disk.put(bytes([7]) * 32, torch.arange(256, dtype=torch.int64).to(torch.uint8))
print(slot.path.name, flush=True)
sys.stdin.read()
"""


def test_a_dead_workers_slot_and_blocks_go_to_the_next_worker(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout.readline().strip() == "prefill-0"
        alive = claim_disk_slot(tmp_path, "prefill")
        assert alive.path.name == "prefill-1"  # the live worker in another process keeps slot 0
        alive.release()
        child.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the lock
        child.wait(10)
        restarted = claim_disk_slot(tmp_path, "prefill")
        assert restarted.path.name == "prefill-0"
        disk = DiskTier(restarted.path, 8)
        assert torch.equal(disk.get(bytes([7]) * 32, NBYTES), torch.arange(256).to(torch.uint8))
        restarted.release()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def test_slot_folders_and_block_files_are_private(tmp_path, open_umask):
    slot = claim_disk_slot(tmp_path / "cache", "decode")
    assert _mode(tmp_path / "cache") == 0o700 and _mode(slot.path) == 0o700
    assert _mode(slot.path / LOCK_NAME) == 0o600
    disk = DiskTier(slot.path, 4)
    disk.put(_h(1), _block(1))
    assert _mode(slot.path / f"{_h(1).hex()}.kv") == 0o600
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    DiskTier(loose, 4)  # a folder made by someone else is made private too
    assert _mode(loose) == 0o700
    slot.release()


def test_the_bound_counts_files_a_previous_process_left(tmp_path):
    first = DiskTier(tmp_path, 4)
    for i in range(1, 5):
        first.put(_h(i), _block(i))
        time.sleep(0.02)  # distinct mtimes: the order a restart reads
    assert first.get(_h(1), NBYTES) is not None  # used last now, on disk too
    smaller = DiskTier(tmp_path, 2)  # restarted with a smaller bound: trimmed at once
    assert len(smaller) == 2 and _block_files(tmp_path) == {f"{_h(i).hex()}.kv" for i in (1, 4)}
    again = DiskTier(tmp_path, 2)
    again.put(_h(5), _block(5))
    assert _h(1) in again and _h(4) not in again and len(_block_files(tmp_path)) == 2


def test_foreign_files_are_neither_counted_nor_touched(tmp_path):
    foreign = {"notes.txt": b"mine", "abc.kv": b"short name", "slot.lock": b"123\n"}
    for name, data in foreign.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / f"{_h(9).hex()}.kv").mkdir()  # a folder with a block file's name
    disk = DiskTier(tmp_path, 2)
    assert len(disk) == 0
    for i in range(1, 5):
        disk.put(_h(i), _block(i))
    assert len(disk) == 2 and len(_block_files(tmp_path)) == 2
    assert all((tmp_path / name).read_bytes() == data for name, data in foreign.items())
    assert DiskTier(tmp_path, 2).get(_h(4), NBYTES) is not None


def test_context_cache_reports_the_blocks_it_found_on_disk(tmp_path):
    DiskTier(tmp_path, 4).put(_h(3), _block(3))
    cache = ContextCache(NBYTES, host_blocks=1, disk_dir=tmp_path, disk_blocks=4)
    assert cache.hashes() == {"host": [], "disk": [_h(3)]}  # what the publisher's snapshot sends
    assert torch.equal(cache.fetch(_h(3)), _block(3))
