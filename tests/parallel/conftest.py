"""Expert-parallel tests share the engine tests' tiny checkpoints (vocab 1024, 8 experts, k = 2)."""

from __future__ import annotations

from ..engine.conftest import tiny_ckpt, tiny_fp8_ckpt  # noqa: F401  (fixtures)
