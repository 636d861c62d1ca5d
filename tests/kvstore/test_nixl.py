"""NIXL KV transfer between real processes: bytes arrive exactly, the holder is notified; a layout
mismatch, a bad or expired handle, blocks the holder freed or reused, a stuck READ or a dead holder
raises TransferError (never a half-read success); a prefill engine in another process hands its KV to
a decode engine that then produces the reference tokens and the prefill engine drops its lease on
the READ's notification.

The holder runs in a "spawn" child; the reader is this process. No UCX variables are set: UCX's
defaults (shared memory + cma, TCP wire-up) work between processes here.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import threading
import time
import uuid

import pytest
import torch

pytest.importorskip("nixl._api")

from kvstore.nixl_transfer import NixlHolder, NixlTransfer, block_runs  # noqa: E402
from kvstore.paged import BlockLayout, PagedKVStorage  # noqa: E402
from kvstore.transfer import TransferError  # noqa: E402
from workers.engine.types import KVHandle, LayoutFingerprint  # noqa: E402

CTX = mp.get_context("spawn")
LAYOUT = dict(num_layers=3, block_size=64, latent_dim=80, latent_dtype=torch.float32, index_dim=32, index_dtype=torch.float32)


def _layout(**changes) -> BlockLayout:
    return BlockLayout(**{**LAYOUT, **changes})


def _fill(storage: PagedKVStorage, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    storage.buffer.copy_(torch.randint(0, 256, storage.buffer.shape, dtype=torch.uint8, generator=g))


def _holder_main(conn, layout_kw: dict, num_blocks: int, seed: int | None, name: str, with_pool: bool = False) -> None:
    """Child: a filled storage behind a NixlHolder; answers "notifs" with read_done() until "stop".
    ``with_pool``: every block is in use in a bound BlockPool (then it sends the generations too);
    ("reuse", blocks) frees those blocks and hands them out again, answering their new generations."""
    from kvstore.block_pool import BlockPool

    storage = PagedKVStorage(BlockLayout(**layout_kw), num_blocks)
    if seed is not None:
        _fill(storage, seed)
    holder = NixlHolder(name, storage)
    pool = BlockPool(num_blocks)
    if with_pool:
        pool.allocate(num_blocks)
        holder.bind_pool(pool)
    conn.send(holder.endpoint())
    if with_pool:
        conn.send(pool.generations(range(num_blocks)))
    while True:
        msg = conn.recv()
        if msg == "stop":
            return
        if msg[0] == "reuse":
            pool.release(msg[1])
            pool.allocate(len(msg[1]))
            conn.send(pool.generations(range(num_blocks)))
            continue
        deadline, seen = time.monotonic() + msg[1], []
        while not seen and time.monotonic() < deadline:
            seen = holder.read_done()
            time.sleep(0.01)
        conn.send(seen)


class Holder:
    """A holder process and its endpoint."""

    def __init__(self, layout_kw: dict = LAYOUT, num_blocks: int = 16, seed: int | None = 0, *, expected: bool = True,
                 with_pool: bool = False) -> None:
        self.conn, child = CTX.Pipe()
        self.name = f"holder-{uuid.uuid4().hex[:8]}"
        self.proc = CTX.Process(target=_holder_main, args=(child, layout_kw, num_blocks, seed, self.name, with_pool),
                                daemon=True)
        self.proc.start()
        if not self.conn.poll(60):
            raise RuntimeError("holder process did not start")
        self.endpoint = self.conn.recv()
        self.generations = self.conn.recv() if with_pool else None
        if expected:
            self.expected = PagedKVStorage(BlockLayout(**layout_kw), num_blocks)
            _fill(self.expected, seed)  # the same bytes the child holds

    def read_done(self, wait_s: float = 5.0) -> list[str]:
        self.conn.send(("notifs", wait_s))
        return self.conn.recv()

    def reuse(self, blocks: list[int]) -> None:
        """The holder frees ``blocks`` and hands them to another request."""
        self.conn.send(("reuse", blocks))
        self.generations = self.conn.recv()

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send("stop")
            self.proc.join(10)
        if self.proc.is_alive():
            self.kill()


def _handle(holder: Holder, block_ids, request_id: str = "req-1", lease_s: float = 60.0, gens: bool = True) -> KVHandle:
    fp = LayoutFingerprint("m", "float32", "exact", 64, 1, 3, holder.endpoint["bytes_per_block"])
    generations = tuple(holder.generations[b] for b in block_ids) if holder.generations and gens else ()
    return KVHandle(worker_id=holder.name, request_id=request_id, block_ids=tuple(block_ids), num_tokens=64 * len(block_ids),
                    first_token=0, fingerprint=fp, lease_expires_at=time.time() + lease_s, endpoint=holder.endpoint,
                    block_generations=generations)


@pytest.fixture(scope="module")
def holder():
    h = Holder()
    yield h
    h.close()


@pytest.fixture(scope="module")
def reader():
    r = NixlTransfer(f"reader-{uuid.uuid4().hex[:8]}", timeout_s=3.0)
    yield r
    r.close()


def test_block_runs_coalesce_consecutive_pairs():
    assert block_runs([3, 4, 5, 9, 1, 2], [0, 1, 7, 8, 2, 3]) == [(3, 0, 2), (5, 7, 1), (9, 8, 1), (1, 2, 2)]
    assert block_runs([], []) == []


def test_blocks_arrive_byte_exact_and_holder_is_notified(holder, reader):
    dst = PagedKVStorage(_layout(), 12)
    src_blocks, dst_blocks = [13, 2, 7, 8, 9, 0], [1, 11, 4, 5, 6, 9]  # scattered, with one coalescible run
    before = reader.stats()
    reader.read(_handle(holder, src_blocks, "req-exact"), dst, dst_blocks)
    assert torch.equal(dst.read_blocks(dst_blocks), holder.expected.read_blocks(src_blocks))
    untouched = [b for b in range(12) if b not in dst_blocks]
    assert not dst.read_blocks(untouched).any()
    assert holder.read_done() == ["req-exact"]
    stats = reader.stats()
    assert stats["backend"] == "nixl" and stats["transfers"] == before["transfers"] + 1
    assert stats["bytes"] - before["bytes"] == len(src_blocks) * dst.layout.bytes_per_block
    assert stats["failures"] == before["failures"]
    # The holder's agent is loaded once: a second read (same storage) reuses it.
    reader.read(_handle(holder, [5], "req-again"), dst, [0])
    assert torch.equal(dst.read_blocks([0]), holder.expected.read_blocks([5]))
    assert holder.read_done() == ["req-again"]


def test_block_size_mismatch_names_both_and_leaves_destination_untouched(holder, reader):
    dst = PagedKVStorage(_layout(latent_dim=96), 4)
    with pytest.raises(TransferError, match=rf"holder .* {holder.endpoint['bytes_per_block']} bytes per block, "
                                            rf"this worker {dst.layout.bytes_per_block}"):
        reader.read(_handle(holder, [1, 2]), dst, [0, 1])
    assert not dst.buffer.any()


def test_bad_handles_are_refused_before_any_byte_moves(holder, reader):
    dst = PagedKVStorage(_layout(), 4)
    with pytest.raises(TransferError, match="source block ids"):
        reader.read(_handle(holder, [16]), dst, [0])
    with pytest.raises(TransferError, match="destination block ids"):
        reader.read(_handle(holder, [1]), dst, [4])
    with pytest.raises(TransferError, match="2 destination blocks for 1 source blocks"):
        reader.read(_handle(holder, [1]), dst, [0, 1])
    # Past the lease the holder may have reused the blocks: reading them would copy someone else's KV.
    with pytest.raises(TransferError, match="lease .* expired"):
        reader.read(_handle(holder, [1], lease_s=-1.0), dst, [0])
    assert not dst.buffer.any()


def test_a_stuck_read_times_out_then_the_next_read_reconnects(holder, monkeypatch):
    r = NixlTransfer(f"reader-{uuid.uuid4().hex[:8]}", timeout_s=0.3)
    dst = PagedKVStorage(_layout(), 16)
    post = r.agent.transfer
    monkeypatch.setattr(r.agent, "transfer", lambda xfer, *a: (post(xfer, *a), "PROC")[1])  # never reports DONE
    monkeypatch.setattr(r.agent, "check_xfer_state", lambda xfer: "PROC")
    try:
        t0 = time.monotonic()
        with pytest.raises(TransferError, match=r"timed out after 0.3 s"):
            r.read(_handle(holder, range(16), "req-stuck"), dst, range(16))
        assert 0.3 <= time.monotonic() - t0 < 2.0
        assert r.stats()["failures"] == 1 and r.stats()["transfers"] == 0
        monkeypatch.undo()
        r.read(_handle(holder, range(16), "req-after"), dst, range(16))  # the holder's agent is loaded afresh
        assert torch.equal(dst.buffer, holder.expected.buffer)
        assert r.stats()["transfers"] == 1
    finally:
        r.close()
    seen = holder.read_done()
    while "req-after" not in seen and len(seen) < 4:
        seen += holder.read_done(wait_s=2.0)
    assert "req-after" in seen


def test_reads_near_or_past_the_lease_end_are_refused(holder, monkeypatch):
    r = NixlTransfer(f"reader-{uuid.uuid4().hex[:8]}", timeout_s=3.0, lease_margin_s=0.2)
    dst = PagedKVStorage(_layout(), 4)
    try:
        # Within the margin of its end (clock skew, a slow READ): refused before any byte moves.
        with pytest.raises(TransferError, match="expired before the read"):
            r.read(_handle(holder, [1], "req-near", lease_s=0.1), dst, [0])
        assert not dst.buffer.any()
        # A READ that completes after the lease's end may hold another request's KV: discarded.
        post = r.agent.transfer
        monkeypatch.setattr(r.agent, "transfer", lambda xfer, *a: (post(xfer, *a), time.sleep(0.5))[0])
        with pytest.raises(TransferError, match="expired during the read"):
            r.read(_handle(holder, [1], "req-late", lease_s=0.5), dst, [0])
        assert r.stats()["failures"] == 2 and r.stats()["transfers"] == 0
    finally:
        r.close()


def test_blocks_the_holder_freed_or_reused_are_refused(monkeypatch):
    h = Holder(num_blocks=8, with_pool=True)
    r = NixlTransfer(f"reader-{uuid.uuid4().hex[:8]}", timeout_s=3.0)
    dst = PagedKVStorage(_layout(), 8)
    try:
        assert "gen_addr" in h.endpoint
        r.read(_handle(h, [1, 2, 5], "req-held"), dst, [0, 1, 2])
        assert torch.equal(dst.read_blocks([0, 1, 2]), h.expected.read_blocks([1, 2, 5]))
        assert h.read_done() == ["req-held"]  # the notification rides on the generations' READ
        # The lease ended early (a stray release, a restarted holder) and block 2 went to another request.
        stale = _handle(h, [1, 2, 5], "req-stale")
        h.reuse([2])
        with pytest.raises(TransferError, match="freed or reused by the holder"):
            r.read(stale, dst, [0, 1, 2])
        # Block 5 is reused while the blocks are on their way: the copy is discarded.
        post, posted = r.agent.transfer, []

        def racing(xfer, *a):
            state = post(xfer, *a)
            if not posted:
                posted.append(True)
                h.reuse([5])
            return state

        monkeypatch.setattr(r.agent, "transfer", racing)
        with pytest.raises(TransferError, match="freed or reused by the holder"):
            r.read(_handle(h, [1, 2, 5], "req-racing"), dst, [0, 1, 2])
        monkeypatch.undo()
        with pytest.raises(TransferError, match="carries no block generations"):
            r.read(_handle(h, [1], "req-bare", gens=False), dst, [0])
        assert r.stats()["failures"] == 3 and r.stats()["transfers"] == 1
    finally:
        r.close()
        h.close()


@pytest.mark.parametrize("when", ["before", "during"])
def test_killed_holder_raises_within_the_timeout(when):
    # 48 blocks of ~6 MiB (~290 MiB): long enough (tens of ms at several GB/s) to be killed mid-READ.
    big = dict(LAYOUT, num_layers=12, latent_dim=2048)
    h = Holder(big, num_blocks=48, seed=None, expected=False)  # zeros: no time spent filling
    r = NixlTransfer(f"reader-{uuid.uuid4().hex[:8]}", timeout_s=3.0)
    dst = PagedKVStorage(BlockLayout(**big), 48)
    try:
        killer = threading.Timer(0.0 if when == "before" else 0.005, h.kill)
        killer.start()
        if when == "before":
            killer.join()
        t0 = time.monotonic()
        with pytest.raises(TransferError):
            r.read(_handle(h, range(48)), dst, range(48))
        assert time.monotonic() - t0 < 3.0 + 2.0
        killer.join()
        assert r.stats() == {"backend": "nixl", "bytes": 0, "transfers": 0, "failures": 1, "seconds": 0.0}
    finally:
        h.close()
        r.close()


# ---------------------------------------------------------------------------------------------- engines
VOCAB = 1024


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from workers.model.presets import load_preset
    from workers.model.writer import random_state_dict, write_checkpoint

    cfg = dataclasses.replace(load_preset("tiny"), vocab_size=VOCAB)
    path = tmp_path_factory.mktemp("tiny-nixl")
    write_checkpoint(path, cfg, random_state_dict(cfg, seed=1))
    return path


def _prefill_main(conn, path, request, name: str) -> None:
    """Child: a prefill engine whose holder is NIXL; sends the handle, then steps until the lease drops."""
    from workers.engine.config import EngineConfig
    from workers.engine.engine import Engine
    from workers.model import load_model

    torch.set_num_threads(1)
    engine = Engine(load_model(path), EngineConfig(num_blocks=16), role="prefill", worker_id="prefill-0",
                    holder_factory=lambda storage: NixlHolder(name, storage))
    out: list = []
    engine.add_request(request, out.append)
    while not out:
        engine.step()
    conn.send(out[0])
    deadline = time.monotonic() + 30
    while len(engine.leases) and time.monotonic() < deadline:
        engine.step()
        time.sleep(0.01)
    conn.send(("leases", len(engine.leases), engine.pool.num_free))
    conn.recv()


def test_prefill_engine_in_another_process_hands_kv_to_decode(tiny_ckpt):
    from tests.engine.conftest import reference_greedy
    from workers.engine.config import EngineConfig
    from workers.engine.engine import Engine
    from workers.engine.types import GenerateRequest, RequestOutput, SamplingParams
    from workers.model import load_model

    # 130 tokens: more than index_topk (sparse attention), 3 blocks of which the last is partial
    ids = tuple(torch.randint(2, VOCAB, (130,), generator=torch.Generator().manual_seed(1)).tolist())
    request = GenerateRequest("disagg-1", ids, SamplingParams(max_tokens=4, ignore_eos=True))
    conn, child = CTX.Pipe()
    proc = CTX.Process(target=_prefill_main, args=(child, tiny_ckpt, request, f"prefill-{uuid.uuid4().hex[:8]}"), daemon=True)
    proc.start()
    transfer = NixlTransfer(f"decode-{uuid.uuid4().hex[:8]}", timeout_s=10.0)
    try:
        model = load_model(tiny_ckpt)
        want = reference_greedy(model, ids, 4)  # while the child prefills
        decode = Engine(model, EngineConfig(num_blocks=16), role="decode", worker_id="decode-0", transfer=transfer)
        assert conn.poll(120), "prefill process sent no handle"
        handle = conn.recv()
        assert isinstance(handle, KVHandle) and handle.endpoint["backend"] == "nixl" and len(handle.block_ids) == 3
        outs, read = [], []
        decode.import_kv(request, handle, outs.append, read.append)
        deadline = time.monotonic() + 60
        while not (outs and outs[-1].finished) and time.monotonic() < deadline:
            decode.step()
        assert read == [None]
        assert all(isinstance(o, RequestOutput) for o in outs) and outs[-1].finish_reason == "length"
        assert [handle.first_token] + [t for o in outs for t in o.new_token_ids] == want
        assert transfer.stats()["bytes"] == 3 * decode.layout.bytes_per_block
        # The prefill engine dropped the lease on the READ's notification alone (no release call).
        assert conn.poll(30)
        assert conn.recv() == ("leases", 0, 16)
        conn.send("stop")
    finally:
        transfer.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def _holder_engine_main(conn, path, first, second_hashes, name: str) -> None:
    """Child: an engine holding ``first``'s blocks behind a NIXL holder; exports the prefix of the
    second prompt, sends the handle, then steps until told to stop (or is killed)."""
    from workers.engine.config import EngineConfig
    from workers.engine.engine import Engine
    from workers.model import load_model

    torch.set_num_threads(1)
    engine = Engine(load_model(path), EngineConfig(num_blocks=16), worker_id="holder-0", model_id="m",
                    holder_factory=lambda storage: NixlHolder(name, storage))
    outs: list = []
    engine.add_request(first, outs.append)
    while not (outs and outs[-1].finished):
        engine.step()
    got: list = []
    engine.export_prefix("pull-1", second_hashes, 0, got.append)
    engine.step()
    conn.send(got[0])
    while not conn.poll(0.01):
        engine.step()
    conn.send(("leases", len(engine.leases)))


@pytest.mark.parametrize("holder", ["alive", "killed"])
def test_a_prefix_pulled_from_a_peer_process_or_recomputed_when_it_died(tiny_ckpt, holder):
    """A peer pull over NIXL between processes: the puller reads the holder's blocks of the shared
    prefix and starts from them; when the holder died between its export and the read, the pull fails
    and the prefix is computed. The tokens are the reference's either way."""
    from kvstore.hashing import block_hashes
    from tests.engine.conftest import reference_greedy
    from workers.engine.config import EngineConfig
    from workers.engine.engine import Engine
    from workers.engine.types import GenerateRequest, SamplingParams
    from workers.model import load_model

    shared = tuple(torch.randint(2, VOCAB, (192,), generator=torch.Generator().manual_seed(2)).tolist())
    first = GenerateRequest("first", shared + (5, 6, 7), SamplingParams(max_tokens=2, ignore_eos=True))
    second = GenerateRequest("pull-1", shared + (9, 8), SamplingParams(max_tokens=4, ignore_eos=True))
    hashes = block_hashes(second.prompt_token_ids[:-1], model_id="m")
    conn, child = CTX.Pipe()
    proc = CTX.Process(target=_holder_engine_main, args=(child, tiny_ckpt, first, hashes, f"holder-{uuid.uuid4().hex[:8]}"),
                       daemon=True)
    proc.start()
    transfer = NixlTransfer(f"puller-{uuid.uuid4().hex[:8]}", timeout_s=5.0)
    try:
        model = load_model(tiny_ckpt)
        want = reference_greedy(model, second.prompt_token_ids, 4)
        puller = Engine(model, EngineConfig(num_blocks=16), worker_id="puller-0", model_id="m", transfer=transfer)
        assert conn.poll(120), "holder process sent no handle"
        handle = conn.recv()
        assert isinstance(handle, KVHandle) and len(handle.block_ids) == 3 and handle.endpoint["backend"] == "nixl"
        if holder == "killed":
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
        outs: list = []
        puller.add_request(second, outs.append, handle)
        while not (outs and outs[-1].finished):
            puller.step()
        assert [t for o in outs for t in o.new_token_ids] == want
        pulled = 3 if holder == "alive" else 0
        assert outs[-1].usage.cached_tokens == 64 * pulled
        assert puller.peers.stats() == {"pulled_blocks": pulled, "pulled_bytes": pulled * puller.layout.bytes_per_block,
                                        "pull_failures": int(holder == "killed"), "exported_blocks": 0}
        if holder == "alive":  # the READ's notification ended the export's lease
            conn.send("stop")
            assert conn.poll(30) and conn.recv() == ("leases", 0)
    finally:
        transfer.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
