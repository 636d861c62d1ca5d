"""Disk-cache folders on a real cluster: each decode replica claims ``decode-<n>``; a replica killed
outright is replaced by one that takes over the same folder (no orphaned folder per restart)."""

from __future__ import annotations

import os
import signal
import stat
import time

import pytest

from kvstore.disk_slot import LOCK_NAME
from router.client import Client

from .conftest import start_cluster

pytestmark = pytest.mark.slow


def _holders(cache) -> dict[str, int]:
    """Slot folder → the pid its lock file names (the process that claimed it last)."""
    out = {}
    for lock in cache.glob(f"*/{LOCK_NAME}"):
        text = lock.read_text().strip()
        out[lock.parent.name] = int(text) if text else 0
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_replaced_replica_takes_over_the_dead_ones_folder(cluster_ckpt, tmp_path):
    cache = tmp_path / "kv"
    running = start_cluster(tmp_path, cluster_ckpt, "ray", decode_replicas=2,
                            decode={"disk_cache_dir": str(cache), "disk_cache_blocks": 64, "host_cache_blocks": 4})
    try:
        holders = _holders(cache)
        assert set(holders) == {"decode-0", "decode-1"} and all(_alive(p) for p in holders.values()), holders
        assert stat.S_IMODE(cache.stat().st_mode) == 0o700
        assert all(stat.S_IMODE((cache / name).stat().st_mode) == 0o700 for name in holders)

        victim = holders["decode-0"]
        os.kill(victim, signal.SIGKILL)  # no cleanup: only the kernel releases the folder's lock
        deadline = time.monotonic() + 180
        while True:
            now = _holders(cache)
            taken_over = now.get("decode-0") not in (None, 0, victim) and _alive(now["decode-0"])
            if taken_over or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert now["decode-0"] != victim and _alive(now["decode-0"]), now
        assert set(now) == {"decode-0", "decode-1"} and now["decode-1"] == holders["decode-1"], now
        with Client(running.address, timeout=120) as client:
            out = client.generate(prompt_ids=list(range(2, 90)), max_tokens=3, ignore_eos=True)
        assert out.finish_reason == "length"
    finally:
        assert running.stop() == 0, running.log.read_text()[-3000:]
