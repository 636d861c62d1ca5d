"""The shared disk tier: one folder of KV blocks for every worker process that mounts it — one
identity, reads of any process's writes, a bound across writers, never a torn block."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvstore.paged import BlockLayout
from kvstore.shared_disk import SharedDiskTier
from kvstore.tiers import ContextCache
from workers.engine.config import EngineConfig
from workers.engine.kv_manager import KVCacheManager

ROOT = Path(__file__).resolve().parents[2]
NBYTES = 256


def _block(seed: int, nbytes: int = NBYTES) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _h(i: int) -> bytes:
    return i.to_bytes(2, "big") * 16


def _files(root: Path) -> set[bytes]:
    return {bytes.fromhex(p.stem) for p in root.glob("*.kv")}


# The other process: prints the folder's volume id, or writes blocks [start, stop) of `nbytes`.
_CHILD = """
import sys, torch
from kvstore.shared_disk import SharedDiskTier
root, capacity, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tier = SharedDiskTier(root, capacity)
if mode == "id":
    print(tier.volume_id, flush=True)
else:
    start, stop, nbytes = (int(a) for a in sys.argv[4:7])
    for i in range(start, stop):
        data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        tier.put(i.to_bytes(2, "big") * 16, data)
    print("done", flush=True)
"""


def _child(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CHILD, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _output(child: subprocess.Popen) -> str:
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    return out.strip()


def test_every_opener_agrees_on_the_volume_id(tmp_path):
    root = tmp_path / "nested" / "shared"
    racers = [_child(root, 8, "id") for _ in range(2)]  # first opens race to create the id
    ids = {_output(c) for c in racers}
    assert len(ids) == 1
    (volume_id,) = ids
    assert SharedDiskTier(root, 8).volume_id == SharedDiskTier(root, 4).volume_id == volume_id
    assert len(volume_id) >= 8 and int(volume_id, 16) >= 0
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert not list(root.glob("*.tmp*"))
    assert SharedDiskTier(tmp_path / "other", 8).volume_id != volume_id


def test_a_block_put_by_one_is_read_by_another_and_after_a_restart(tmp_path):
    a, b = SharedDiskTier(tmp_path, 8), SharedDiskTier(tmp_path, 8)
    assert a.put(_h(1), _block(1)) == []
    assert _h(1) in b and b.hashes() == [_h(1)]
    assert torch.equal(b.get(_h(1), NBYTES), _block(1))
    assert torch.equal(SharedDiskTier(tmp_path, 8).get(_h(1), NBYTES), _block(1))
    assert b.put(_h(1), _block(1)) == []  # already there: not rewritten
    b.remove(_h(1))
    assert _h(1) not in a and a.get(_h(1), NBYTES) is None


def test_the_bound_holds_across_writers_oldest_first_and_reads_refresh(tmp_path):
    a, b = SharedDiskTier(tmp_path, 8), SharedDiskTier(tmp_path, 8)
    old = time.time() - 1000
    for i in range(8):  # two writers take turns; mtimes set apart (file times can be coarse)
        assert (a if i % 2 else b).put(_h(i), _block(i)) == []
        os.utime(tmp_path / f"{_h(i).hex()}.kv", (old + i, old + i))
    assert torch.equal(b.get(_h(0), NBYTES), _block(0))  # read by b: now the newest for a's sweep
    evicted = a.put(_h(8), _block(8))  # 9 files: a sweeps down to its low-water mark of 7
    assert evicted == [_h(1), _h(2)] and _files(tmp_path) == {_h(i) for i in (0, 3, 4, 5, 6, 7, 8)}
    for i in range(9, 30):
        (a if i % 2 else b).put(_h(i), _block(i))
        assert len(_files(tmp_path)) <= 8
    writer = _child(tmp_path, 8, "write", 100, 140, NBYTES)  # a third writer, another process
    assert _output(writer) == "done" and len(_files(tmp_path)) <= 8


def test_torn_corrupt_or_wrong_size_files_read_as_misses_and_are_deleted(tmp_path, caplog):
    tier = SharedDiskTier(tmp_path, 8)
    for i in (1, 2, 3, 4):
        tier.put(_h(i), _block(i))
    torn, flipped, stub = (tmp_path / f"{_h(i).hex()}.kv" for i in (1, 2, 4))
    os.truncate(torn, torn.stat().st_size - 10)  # a write cut short
    with open(flipped, "r+b") as f:  # one byte of rot in the payload
        f.seek(-1, os.SEEK_END)
        last = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last ^ 0xFF]))
    os.truncate(stub, 5)  # shorter than a header
    with caplog.at_level(logging.WARNING):
        assert tier.get(_h(1), NBYTES) is None and not torn.exists()
        assert tier.get(_h(2), NBYTES) is None and not flipped.exists()
        assert tier.get(_h(3), NBYTES + 1) is None and _h(3) not in tier  # never KV of another size
        assert tier.get(_h(4), NBYTES) is None and not stub.exists()
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 4
    assert tier.get(_h(9), NBYTES) is None  # a plain miss


def test_reads_during_another_processs_writes_are_never_torn(tmp_path, caplog):
    nbytes, n = 1 << 20, 80
    tier = SharedDiskTier(tmp_path, 32)
    writer = _child(tmp_path, 32, "write", 0, n, nbytes)  # its sweeps evict while this one reads
    checked: set[bytes] = set()
    rounds = 0
    with caplog.at_level(logging.WARNING):
        deadline = time.monotonic() + 30
        while writer.poll() is None and time.monotonic() < deadline:
            rounds += 1
            for h in set(tier.hashes()) - checked:  # the newest files: a torn write would show here
                data = tier.get(h, nbytes)
                if data is not None:
                    assert torch.equal(data, _block(int.from_bytes(h[:2], "big"), nbytes))
                    checked.add(h)
            if rounds % 50 == 0:  # this process writes too, but mostly polls
                tier.put(_h(1000 + rounds % 1000), _block(1000 + rounds % 1000, nbytes))
    assert _output(writer) == "done" and len(checked) > 10
    assert not [r for r in caplog.records if "unreadable" in r.getMessage()]


def test_a_sweep_removes_abandoned_temp_files_but_not_a_live_writers(tmp_path):
    fresh, stale = tmp_path / f"{_h(1).hex()}.tmp4242.7.ab", tmp_path / f"{_h(2).hex()}.tmp4243.7.ab"
    fresh.write_bytes(b"partial")
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 120, time.time() - 120))
    tier = SharedDiskTier(tmp_path, 2)
    assert fresh.exists() and stale.exists()  # opening never deletes: another process may be writing
    tier.put(_h(3), _block(3))  # below the bound: a sweep is due after one write at this size
    assert fresh.exists() and not stale.exists()


def test_a_full_disk_loses_the_block_never_the_request(tmp_path, monkeypatch, caplog):
    events: list[tuple[str, bytes]] = []
    tier_events: list[tuple[str, str, bytes]] = []
    shared = SharedDiskTier(tmp_path / "shared", 4)
    cache = ContextCache(NBYTES, 0, tmp_path / "own", 4, on_event=lambda *e: tier_events.append(e),
                         shared=shared, on_shared_event=lambda kind, h: events.append((kind, h)))

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with caplog.at_level(logging.WARNING):
        assert shared.put(_h(1), _block(1)) == []
        cache.demote(_h(2), _block(2))  # through host (size 0) to both disk tiers: both refuse
    assert events == [] and ("stored", "disk", _h(2)) not in tier_events and _h(2) not in cache
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and ".tmp" in p.name]
    assert sum("cannot write block file" in r.getMessage() for r in caplog.records) == 3


def test_context_caches_share_demoted_blocks_and_report_them(tmp_path):
    events_a: list[tuple[str, bytes]] = []
    shared_a, shared_b = SharedDiskTier(tmp_path, 3), SharedDiskTier(tmp_path, 3)
    a = ContextCache(NBYTES, 1, shared=shared_a, on_shared_event=lambda kind, h: events_a.append((kind, h)))
    b = ContextCache(NBYTES, 1, shared=shared_b)
    a.demote(_h(1), _block(1))
    a.demote(_h(2), _block(2))  # pushes 1 out of a's host tier into the shared folder
    assert events_a == [("stored", _h(1))] and _h(1) in b and _h(1) not in b.host
    assert torch.equal(b.fetch(_h(1)), _block(1)) and b.hits["shared"] == 1 and _h(1) in b.host
    assert a.hashes() == {"host": [_h(2)], "disk": []}  # the volume's blocks are not the worker's
    for i in range(3, 9):
        a.demote(_h(i), _block(i))
    stored = {h for kind, h in events_a if kind == "stored"}
    removed = {h for kind, h in events_a if kind == "removed"}
    assert stored == {_h(i) for i in range(1, 8)} and removed  # 7 written into 3 slots
    assert set(shared_b.hashes()) == stored - removed


def test_the_engine_builds_a_shared_tier_alone_and_restores_from_it(tmp_path):
    layout = BlockLayout(num_layers=1, block_size=4, latent_dim=8, latent_dtype=torch.float32, index_dim=4,
                         index_dtype=torch.float32)
    config = EngineConfig(num_blocks=4, block_size=4, shared_disk_dir=str(tmp_path), shared_disk_blocks=8)
    events: list[tuple[str, bytes]] = []
    first = KVCacheManager(layout, config, "cpu", on_shared_event=lambda kind, h: events.append((kind, h)))
    assert first.shared_disk is not None and first.context_cache is not None
    data = _block(5, layout.bytes_per_block)
    first.context_cache.demote(_h(5), data)  # no host tier: straight to the shared folder
    assert events == [("stored", _h(5))]
    second = KVCacheManager(layout, config, "cpu")
    assert second.shared_disk.volume_id == first.shared_disk.volume_id
    (block,) = second.restore([_h(5)])
    assert torch.equal(second.storage.read_blocks([block])[0], data)
    assert KVCacheManager(layout, EngineConfig(num_blocks=4, block_size=4), "cpu").shared_disk is None
