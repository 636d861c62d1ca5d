"""The tiny model on a GPU in bf16 against the CPU float32 reference: same first greedy tokens through
the engine (prefill → KV handle → decode), logits within bf16 tolerance, KV pool sized from memory."""

from __future__ import annotations

import asyncio

import pytest
import torch

from cluster.local import LocalBackend
from workers.engine.config import EngineConfig
from workers.engine.types import GenerateRequest, SamplingParams
from workers.model import load_model

from ..engine.conftest import prompt, reference_greedy, tiny_ckpt  # noqa: F401  (fixture)

pytestmark = pytest.mark.gpu
N_TOKENS = 4


def run(backend: LocalBackend, ids: tuple[int, ...], n: int, seed: int | None = None) -> list[int]:
    async def go() -> list[int]:
        params = SamplingParams(max_tokens=n, ignore_eos=True, seed=seed, temperature=0.8 if seed else 0.0)
        out = [o async for o in backend.generate(GenerateRequest("r", ids, params))]
        return [t for o in out for t in o.new_token_ids]

    return asyncio.run(go())


def test_bf16_on_gpu_matches_the_cpu_reference(tiny_ckpt) -> None:  # noqa: F811
    ids = prompt(40, seed=3)
    cpu = load_model(tiny_ckpt, dtype=torch.float32)
    want = reference_greedy(cpu, ids, N_TOKENS)
    with LocalBackend.start(tiny_ckpt, dtype=torch.bfloat16, device="cuda",
                            engine_config=EngineConfig(kv_memory_fraction=0.5)) as backend:
        assert backend.device.type == "cuda" and backend.decode_engine.config.num_blocks > 0
        got = run(backend, ids, N_TOKENS)
        assert got[:2] == want[:2], (got, want)  # bf16 may flip a near-tie later on
        assert len(run(backend, ids, N_TOKENS, seed=7)) == N_TOKENS  # seeded sampling on the GPU
    gpu = load_model(tiny_ckpt, dtype=torch.bfloat16, device="cuda")
    x = torch.tensor([ids])
    with torch.inference_mode():
        ref = cpu.logits(x)[0, -1].float()
        got_logits = gpu.logits(x.cuda())[0, -1].float().cpu()
    assert torch.allclose(got_logits, ref, atol=0.05 * ref.abs().max().item(), rtol=0.05)
