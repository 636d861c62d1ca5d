"""Where and in what dtype a model is loaded: ``--device auto|cpu|cuda[:N]``, ``--dtype
auto|float32|bfloat16`` and ``ClusterConfig.device``/``ClusterConfig.dtype``.

bfloat16 halves weight memory and bandwidth, but pays off only where matmuls run natively in it: a
GPU with bf16 units, or a CPU with AVX-512-BF16 or AMX. On an AVX2-only CPU bf16 matmuls are
emulated (~300× slower than float32), so ``auto`` picks float32 there.

torch is imported inside the functions: the CLI builds its parser from ``DTYPE_CHOICES`` and
answers argument errors without loading torch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_CHOICES = ("auto", "float32", "bfloat16")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")
FAST_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpu_has_fast_bf16(cpuinfo: str | Path = CPUINFO) -> bool:
    """Whether this CPU computes bf16 natively: its ``/proc/cpuinfo`` flags name ``avx512_bf16`` or
    ``amx_bf16``.

    False when the file is absent or unreadable (not Linux, a sandbox): float32 is the safe choice.
    """
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":  # every core lists the same flags: the first line decides
            return not FAST_BF16_CPU_FLAGS.isdisjoint(value.split())
    return False


def device_has_fast_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls are fast on ``device``: a CUDA device with native bf16 (Ampere or
    newer), or a CPU with :func:`cpu_has_fast_bf16`. Other devices: False."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":  # emulated bf16 (pre-Ampere) is as slow as the CPU's: not fast
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_fast_bf16()
    return False


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype for a ``dtype`` setting, on the device the weights will live on.

    ``"float32"`` and ``"bfloat16"`` map directly; ``"auto"`` is bfloat16 when
    :func:`device_has_fast_bf16` holds for ``device``, else float32.

    Raises:
        ValueError: ``name`` is not one of ``DTYPE_CHOICES`` (the message names the field ``dtype``).
    """
    import torch

    if name == "auto":
        return torch.bfloat16 if device_has_fast_bf16(device) else torch.float32
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}; got {name!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``: the setting that names a resolved dtype (the inverse of
    :func:`resolve_dtype` for float32 and bfloat16)."""
    return str(dtype).removeprefix("torch.")


def check_device_name(name: str) -> str:
    """``name`` if it is a device setting (``auto``, ``cpu``, ``cuda`` or ``cuda:N``).

    Raises:
        ValueError: naming the field ``device`` and the accepted forms.
    """
    if not DEVICE_PATTERN.match(name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}")
    return name


def resolve_device(name: str) -> torch.device:
    """The torch device for a ``device`` setting: ``auto`` is the first CUDA device this process sees
    (a Ray replica sees the GPU Ray assigned it as ``cuda:0``), else the CPU.

    Raises:
        ValueError: a malformed name, or ``cuda``/``cuda:N`` where this process has no such device.
    """
    import torch

    check_device_name(name)
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index or 0
        if index >= count:
            raise ValueError(f"device {name!r}: this process sees {count} CUDA device(s)")
        device = torch.device("cuda", index)
    return device
