"""One context cache for the whole cluster (real Ray Serve, real Redis, real NIXL): 2 prefill replicas
and 1 decode replica.

- The router remembers where it just sent a prefix: back-to-back and concurrent requests sharing a
  600-token prefix compute only their suffix after the first.
- A busy holder is bypassed by a peer pull: the other prefill replica reads the prefix over NIXL.
- A conversation's next turn reuses the blocks the decode replica filled while answering.
- The shared disk cache folder serves hits after every replica restarted.

The routing cost model is calibrated to ~1 ms of prefill per token (``routing.linear_flops_per_s``),
about what the tiny model costs here, so that queues and pulls weigh as they would on real hardware.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import time

import pytest
import torch

from kvstore.hashing import block_hashes
from kvstore.redis_index import RedisKVIndex
from router.client import Client
from router.cost_model import DSACostModel
from workers.model import load_model
from workers.model.config import ModelConfig

from ..engine.conftest import reference_greedy
from ..redis_server import running_redis
from .conftest import VOCAB, start_cluster

pytestmark = pytest.mark.slow
pytest.importorskip("nixl._api")


def _ids(n: int, seed: int) -> tuple[int, ...]:
    return tuple(torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist())


class Cluster:
    """The module's running cluster; the restart test replaces it."""

    def __init__(self, tmp, ckpt, redis_url: str) -> None:
        rate = DSACostModel.from_model_config(ModelConfig.from_hf(ckpt)).linear_flops_per_token * 1000.0
        self.args = dict(
            decode_replicas=1, prefill_replicas=2, redis_url=redis_url, redis={"worker_ttl_s": 3},
            routing={"temperature_s": 0.0, "linear_flops_per_s": rate, "index_flops_per_s": rate},
            prefill={"num_blocks": 48, "max_num_batched_tokens": 64},
            decode={"num_blocks": 96},
            shared_disk_cache={"dir": str(tmp / "kv-shared"), "max_blocks": 4096},
        )
        self.tmp, self.ckpt, self.redis_url, self.runs = tmp, ckpt, redis_url, 0
        self.running = self._start()

    def _start(self):
        self.runs += 1
        folder = self.tmp / f"run{self.runs}"
        folder.mkdir()
        return start_cluster(folder, self.ckpt, "nixl", **self.args)

    def restart(self) -> None:
        assert self.running.stop() == 0, self.running.log.read_text()[-3000:]
        self.running = self._start()

    @property
    def address(self) -> str:
        return self.running.address


@pytest.fixture(scope="module")
def cluster(cluster_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peer-cache")
    with running_redis(tmp) as redis:
        running = Cluster(tmp, cluster_ckpt, redis.url)
        yield running
        assert running.running.stop() == 0, running.running.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def model(cluster_ckpt):
    return load_model(cluster_ckpt)


def _generate(address: str, ids, n: int = 2):
    with Client(address, timeout=180) as client:
        return client.generate(prompt_ids=list(ids), max_tokens=n, ignore_eos=True)


def _workers(address: str) -> dict[str, dict]:
    with Client(address, timeout=30) as client:
        return {w["id"]: w for w in client.status()["workers"]}


def _held(cluster: Cluster, ids) -> dict[str, int]:
    """What the KV index says each worker (and the shared folder) holds of ``ids``."""
    async def lookup():
        index = RedisKVIndex(cluster.redis_url, cluster.ckpt.name, 64)
        try:
            found = await index.longest_prefix(block_hashes(ids, model_id=cluster.ckpt.name, block_size=64))
        finally:
            await index.close()
        return {w: m.matched_blocks for w, m in found.items()}

    return asyncio.run(lookup())


def _wait_held(cluster: Cluster, ids, blocks: int, role: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(w.startswith(role) and n >= blocks for w, n in _held(cluster, ids).items()):
            return
        time.sleep(0.1)
    raise AssertionError(f"no {role} entry of the index holds {blocks} blocks: {_held(cluster, ids)}")


def test_back_to_back_and_concurrent_requests_compute_only_their_suffix(cluster):
    prefix = _ids(600, 1)
    first = _generate(cluster.address, prefix + _ids(20, 2))
    again = _generate(cluster.address, prefix + _ids(20, 3))  # at once: the index may not know yet
    assert first.usage.cached_tokens == 0 and again.usage.cached_tokens >= 512
    prefix = _ids(600, 4)
    with cf.ThreadPoolExecutor(8) as pool:
        done = list(pool.map(lambda i: _generate(cluster.address, prefix + _ids(20, 10 + i)), range(8)))
    cached = sorted(c.usage.cached_tokens for c in done)
    assert cached[0] == 0 and all(c >= 512 for c in cached[1:]), cached


def test_a_busy_holder_lends_its_prefix_to_the_other_replica(cluster, model):
    prefix = _ids(600, 5)
    _generate(cluster.address, prefix + _ids(20, 6))
    _wait_held(cluster, prefix, 9, "prefill")
    time.sleep(1.0)  # the workers' periodic counters catch up with the first request
    before = _workers(cluster.address)
    prompts = [prefix + _ids(1200, 20 + i) for i in range(4)]  # the first keeps its holder busy ~1 s
    with cf.ThreadPoolExecutor(4) as pool:
        done = list(pool.map(lambda p: _generate(cluster.address, p, 3), prompts))
    assert all(c.usage.cached_tokens >= 512 for c in done), [c.usage.cached_tokens for c in done]
    for p, c in zip(prompts, done):
        assert list(c.token_ids) == reference_greedy(model, p, 3)

    def moved() -> dict[str, dict[str, int]]:
        after = _workers(cluster.address)
        return {w: {k: after[w].get("peer_pulls", {}).get(k, 0) - before.get(w, {}).get("peer_pulls", {}).get(k, 0)
                    for k in ("pulled_blocks", "pulled_bytes", "exported_blocks")} for w in after}

    # The prefix is read by the other prefill replica, from whichever replica holds it (the decode
    # replica holds it too: it imported the first request's blocks). Counters arrive periodically.
    def pulled(delta) -> bool:
        return (any(d["pulled_blocks"] >= 9 and d["pulled_bytes"] > 0 for w, d in delta.items() if w.startswith("prefill"))
                and any(d["exported_blocks"] >= 9 for d in delta.values()))

    deadline = time.monotonic() + 15
    while not pulled(delta := moved()) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert pulled(delta), delta


def test_the_next_turn_reuses_blocks_the_decode_replica_filled(cluster, model):
    turn1 = _ids(600, 7)
    answer = _generate(cluster.address, turn1, 100)
    history = turn1 + tuple(answer.token_ids)  # 700 tokens: the decode replica filled blocks 9 (up to 640)
    _wait_held(cluster, history, 10, "decode")
    turn2 = history + _ids(30, 8)
    done = _generate(cluster.address, turn2, 3)
    assert done.usage.cached_tokens == 640  # the prefill replicas held 9 blocks; the 10th came from decode
    assert list(done.token_ids) == reference_greedy(model, turn2, 3)


def test_the_shared_disk_cache_serves_hits_after_every_replica_restarted(cluster):
    prefix = _ids(600, 9)
    _generate(cluster.address, prefix + _ids(20, 10))
    for i in range(40):  # other prompts push it out of the replicas' memory, onto the shared disk
        if _held(cluster, prefix).get(_volume(cluster), 0) >= 9:
            break
        _generate(cluster.address, _ids(600, 100 + i), 1)
    else:
        raise AssertionError(f"the prefix never reached the shared disk: {_held(cluster, prefix)}")
    cluster.restart()
    done = _generate(cluster.address, prefix + _ids(20, 11))
    assert done.usage.cached_tokens >= 512
    deadline = time.monotonic() + 15  # workers publish their counters periodically
    while (hits := _shared_hits(cluster)) < 9 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert hits >= 9


def _shared_hits(cluster: Cluster) -> int:
    return sum(w.get("context_cache_hits", {}).get("shared", 0) for w in _workers(cluster.address).values())


def _volume(cluster: Cluster) -> str:
    volumes = {w.get("disk_volume") for w in _workers(cluster.address).values()} - {None}
    assert len(volumes) == 1, volumes
    return f"volume-{volumes.pop()}"
