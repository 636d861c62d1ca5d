"""GPU tests: collected everywhere, run only where CUDA is available (marker ``gpu``)."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (none on this machine)")
    for item in items:  # every item of the session: select by the marker, not by keywords (ids say "gpu" too)
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
