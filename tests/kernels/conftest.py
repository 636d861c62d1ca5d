"""Kernel tests at small shapes. Without CUDA the Triton kernels run on CPU through Triton's
interpreter (the variable must be set before triton is imported); with CUDA they run natively.
Without triton installed the whole directory is skipped."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    collect_ignore_glob = ["test_*.py"]
elif not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """Where the kernels run: CUDA when present, else CPU (interpreted)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
