"""The DeepSeek-V3.2 model on one device: config, modules, checkpoint loading.

Names are resolved lazily so that importing a light submodule (``workers.model.config``) does not
import the model or torch-heavy code it does not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.model.checkpoint import load_model
    from workers.model.config import ModelConfig
    from workers.model.model import DeepseekV32

__all__ = ["DeepseekV32", "ModelConfig", "load_model"]

_EXPORTS: dict[str, str] = {
    "DeepseekV32": "workers.model.model",
    "ModelConfig": "workers.model.config",
    "load_model": "workers.model.checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
