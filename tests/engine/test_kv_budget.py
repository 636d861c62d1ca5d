"""The KV pool sized from a memory budget (``kv_memory_bytes``/``kv_memory_fraction``), and the
weight and KV sizes every worker reports in its stats."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from workers.engine import kv_budget
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.model import load_model

from .conftest import tiny_ckpt  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def model(tiny_ckpt):  # noqa: F811
    return load_model(tiny_ckpt, dtype=torch.bfloat16)


def test_blocks_from_a_byte_budget(model) -> None:
    probe = Engine(model, EngineConfig(num_blocks=4))
    per_block = probe.layout.bytes_per_block
    engine = Engine(model, EngineConfig(num_blocks=4, kv_memory_bytes=37 * per_block + per_block // 2))
    assert engine.config.num_blocks == 37 and engine.pool.num_free == 37
    stats = engine.stats()
    assert stats.total_blocks == 37
    assert stats.kv_bytes_per_token == per_block / engine.layout.block_size
    params = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert stats.weight_bytes == params and params < sum(p.numel() for p in model.parameters()) * 4


def test_a_budget_below_one_block_names_the_setting(model) -> None:
    with pytest.raises(ValueError, match=r"kv_memory_bytes=10 leaves 10 bytes .* one block of 64 tokens needs"):
        Engine(model, EngineConfig(kv_memory_bytes=10))


def test_fraction_of_available_memory_on_the_cpu(model) -> None:
    cfg = EngineConfig(num_blocks=4, kv_memory_fraction=0.01)
    layout = Engine(model, EngineConfig(num_blocks=4)).layout
    want = kv_budget.available_bytes(torch.device("cpu"), 0.01) // layout.bytes_per_block
    fitted = kv_budget.fit(cfg, layout, torch.device("cpu"))
    assert fitted.num_blocks > 4 and abs(fitted.num_blocks - want) <= max(2, want // 20)  # memory moves a little
    assert kv_budget.fit(dataclasses.replace(cfg, kv_memory_fraction=None), layout, torch.device("cpu")) == \
        dataclasses.replace(cfg, kv_memory_fraction=None)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kv_memory_bytes": 1, "kv_memory_fraction": 0.5}, "not both"),
    ({"kv_memory_fraction": 1.5}, r"kv_memory_fraction must be in \(0, 1\]"),
    ({"kv_memory_bytes": 0}, "kv_memory_bytes must be ≥ 1"),
])
def test_bad_budgets_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)
