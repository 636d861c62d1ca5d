"""Triton kernels for DeepSeek Sparse Attention over the paged cache and for the MoE, each beside its PyTorch reference.

- ``indexer``: lightning-indexer logits over paged (FP8) index keys, for decode and causal prefill;
  top-k selection on those logits runs in torch.
- ``sparse_mla``: absorbed MLA over each query's selected latents, read in place from the paged cache
  (decode with split-K, prefill one pass).
- ``attend``: the engine's decode and sparse-prefill attention through both (``step_attention`` calls it
  on CUDA; its PyTorch path stays the reference).
- ``moe``: the routed experts as two grouped GEMMs over tokens aligned by expert, with no host sync
  (``MoE.forward`` uses it on CUDA once the experts are stacked; ``MoE.routed`` is the reference).

Triton is optional: ``available(t)`` says whether the engine should use the kernels for ``t`` (CUDA
tensors only; on CPU the engine keeps its PyTorch path). Submodules import triton, so import them only
after ``available()`` says so, or in tests that run them through Triton's interpreter.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.cache  # asked per layer per step: look the package up once
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def available(t: torch.Tensor) -> bool:
    """Whether the engine runs the Triton kernels for tensors like ``t``: on CUDA, when triton imports."""
    return t.is_cuda and triton_importable()
