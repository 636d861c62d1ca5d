"""Sizing the KV pool from a memory budget instead of a fixed block count.

``EngineConfig.kv_memory_bytes`` gives the KV pool a byte budget; ``kv_memory_fraction`` (as vLLM's
``gpu_memory_utilization``) says how much of the device this process may fill, and the KV pool gets
what the weights (already loaded) leave of it:

- CUDA: ``fraction × total − (total − free)``, from ``torch.cuda.mem_get_info`` (memory other
  processes hold counts as used);
- CPU: ``fraction × MemAvailable`` (``/proc/meminfo``), i.e. a share of what the machine has free now.

The pool then holds ``budget // bytes_per_block`` blocks (``BlockLayout.bytes_per_block``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from kvstore.paged import BlockLayout

from .config import EngineConfig

MEMINFO = Path("/proc/meminfo")


def available_bytes(device: torch.device, fraction: float) -> int:
    """Bytes the KV pool may take on ``device`` under ``fraction`` (see the module docstring)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(fraction * total - (total - free))
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(fraction * int(line.split()[1]) * 1024)
    except OSError:
        pass
    raise ValueError("kv_memory_fraction needs /proc/meminfo on a CPU device; set kv_memory_bytes instead")


def fit(config: EngineConfig, layout: BlockLayout, device: torch.device) -> EngineConfig:
    """``config`` with ``num_blocks`` from its memory budget (unchanged when it sets none).

    Raises:
        ValueError: the budget holds no block (names the setting, the budget and a block's bytes).
    """
    if config.kv_memory_bytes is None and config.kv_memory_fraction is None:
        return config
    if config.kv_memory_bytes is not None:
        budget, name = config.kv_memory_bytes, f"kv_memory_bytes={config.kv_memory_bytes}"
    else:
        budget = available_bytes(device, config.kv_memory_fraction)
        name = f"kv_memory_fraction={config.kv_memory_fraction}"
    blocks = budget // layout.bytes_per_block
    if blocks < 1:
        raise ValueError(f"{name} leaves {max(budget, 0)} bytes for the KV cache on {device}; one block of "
                         f"{layout.block_size} tokens needs {layout.bytes_per_block}")
    return dataclasses.replace(config, num_blocks=int(blocks))
