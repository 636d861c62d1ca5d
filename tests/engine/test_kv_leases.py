"""A decode worker never decodes on KV its prefill worker no longer holds for it: a read after the
lease expired, or of blocks the prefill engine has since reused for another request, fails with
TransferError, and the request still completes with the reference tokens by recomputing."""

from __future__ import annotations

import asyncio
import time

from cluster.local import LocalBackend
from kvstore.transfer import LocalTransfer, TransferError
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.types import GenerateRequest, KVHandle, SamplingParams
from workers.model import load_model

from .conftest import prompt, reference_greedy


def _greedy(rid: str, ids, n: int) -> GenerateRequest:
    return GenerateRequest(rid, tuple(ids), SamplingParams(max_tokens=n, ignore_eos=True))


def test_a_read_after_the_lease_expired_is_refused_and_the_request_is_recomputed(tiny_ckpt):
    p = prompt(40, seed=3)
    want = reference_greedy(load_model(tiny_ckpt), p, 6)
    with LocalBackend.start(tiny_ckpt, engine_config=EngineConfig(num_blocks=32, lease_s=0.001)) as be:
        real = be.transfer.read

        def late_read(handle, dst, blocks):
            time.sleep(0.01)  # the reader gets to the blocks after the lease's end
            return real(handle, dst, blocks)

        be.transfer.read = late_read

        async def run():
            return [out async for out in be.generate(_greedy("r", p, 6))]

        outs = asyncio.run(run())
        assert [t for o in outs for t in o.new_token_ids] == want and outs[-1].finish_reason == "length"
        stats = be.transfer.stats()
        assert stats["failures"] == 1 and stats["transfers"] == 0  # refused, then recomputed
        assert not len(be.prefill_engine.leases) and be.prefill_engine.pool.num_free == 32


def _step_until(engine: Engine, done, limit: int = 200) -> None:
    for _ in range(limit):
        if done():
            return
        engine.step()
    raise AssertionError("engine did not get there")


def test_blocks_reused_by_the_prefill_engine_are_refused(tiny_ckpt):
    model = load_model(tiny_ckpt)
    cfg = EngineConfig(num_blocks=3, block_size=16, lease_s=60.0)  # one 40-token prompt fills the pool
    transfer = LocalTransfer()
    prefill = Engine(model, cfg, role="prefill", worker_id="prefill-0",
                     holder_factory=lambda storage: transfer.holder("prefill-0", storage))
    decode = Engine(model, cfg, role="decode", worker_id="decode-0", transfer=transfer)
    first, second = _greedy("first", prompt(40, seed=1), 4), _greedy("second", prompt(40, seed=2), 4)
    got: list = []
    prefill.add_request(first, got.append)
    _step_until(prefill, lambda: got)
    handle = got.pop()
    assert isinstance(handle, KVHandle) and len(handle.block_generations) == 3
    before = prefill.storage.read_blocks(handle.block_ids)
    # The lease ends early (e.g. a release sent by mistake) and another request takes the blocks.
    prefill.release("first")
    prefill.add_request(second, got.append)
    _step_until(prefill, lambda: got)
    assert sorted(got[0].block_ids) == sorted(handle.block_ids)
    assert not prefill.storage.read_blocks(handle.block_ids).equal(before)  # the KV there is another's now

    outs, read = [], []
    decode.import_kv(first, handle, outs.append, read.append)
    _step_until(decode, lambda: read)
    assert isinstance(read[0], TransferError) and "reused" in str(read[0])
    assert not outs and decode.pool.num_free == 3 and not decode.scheduler.running
