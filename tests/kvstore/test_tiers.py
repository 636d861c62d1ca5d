"""The context cache: host and disk tiers, byte-exact, bounded, crash-safe."""

from __future__ import annotations

import torch

from kvstore.tiers import ContextCache, DiskTier, HostTier

NBYTES = 256


def _block(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (NBYTES,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _h(i: int) -> bytes:
    return bytes([i]) * 32


def test_host_tier_is_lru_bounded():
    host = HostTier(2)
    assert host.put(_h(1), _block(1)) == [] and host.put(_h(2), _block(2)) == []
    host.get(_h(1))  # 1 is now the most recent
    evicted = host.put(_h(3), _block(3))
    assert [h for h, _ in evicted] == [_h(2)] and _h(1) in host and _h(3) in host


def test_disk_round_trip_is_byte_exact_and_survives_a_restart(tmp_path):
    disk = DiskTier(tmp_path, 4)
    disk.put(_h(1), _block(1))
    again = DiskTier(tmp_path, 4)  # a new process finds the files
    assert torch.equal(again.get(_h(1), NBYTES), _block(1))


def test_torn_or_corrupted_files_are_rejected_and_removed(tmp_path):
    disk = DiskTier(tmp_path, 8)
    for i in (1, 2, 3):
        disk.put(_h(i), _block(i))
    torn = tmp_path / f"{_h(1).hex()}.kv"
    torn.write_bytes(torn.read_bytes()[:-10])  # a write cut short
    flipped = tmp_path / f"{_h(2).hex()}.kv"
    raw = bytearray(flipped.read_bytes())
    raw[-1] ^= 0xFF  # one bit of rot
    flipped.write_bytes(bytes(raw))
    assert disk.get(_h(1), NBYTES) is None and not torn.exists()
    assert disk.get(_h(2), NBYTES) is None and not flipped.exists()
    assert disk.get(_h(3), NBYTES + 1) is None  # wrong size for this layout: never KV
    (tmp_path / "leftover.tmp123.4").write_bytes(b"partial")
    DiskTier(tmp_path, 8)
    assert not (tmp_path / "leftover.tmp123.4").exists()


def test_disk_capacity_evicts_oldest(tmp_path):
    disk = DiskTier(tmp_path, 2)
    for i in (1, 2, 3):
        disk.put(_h(i), _block(i))
    assert _h(1) not in disk and len(list(tmp_path.glob("*.kv"))) == 2


def test_demotion_host_then_disk_and_promotion(tmp_path):
    events = []
    cache = ContextCache(NBYTES, host_blocks=1, disk_dir=tmp_path, disk_blocks=4,
                         on_event=lambda kind, tier, h: events.append((kind, tier, h[0])))
    cache.demote(_h(1), _block(1))
    cache.demote(_h(2), _block(2))  # pushes 1 to disk
    assert ("stored", "disk", 1) in events and ("removed", "host", 1) in events
    assert torch.equal(cache.fetch(_h(1)), _block(1)) and cache.hits["disk"] == 1
    assert _h(1) in cache.host  # promoted
    assert torch.equal(cache.fetch(_h(1)), _block(1)) and cache.hits["host"] == 1
    assert cache.fetch(_h(9)) is None
