"""The engine step with the Triton kernels wired in (``step_attention`` on CUDA) equals the reference
forward. Here the kernels run interpreted on CPU: ``kernels.available`` is forced on."""

from __future__ import annotations

import pytest
import torch

from tests.model.test_step import Seqs, _close, _model
from workers import kernels
from workers.kernels import attend


pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="forces the kernels on CPU tensors (interpreted)")


@pytest.fixture
def kernels_on(monkeypatch):
    calls = {"decode": 0, "prefill_sparse": 0}
    for name in calls:
        real = getattr(attend, name)

        def counted(*args, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(attend, name, counted)
    monkeypatch.setattr(kernels, "available", lambda t: True)
    return calls


def test_sparse_prefill_chunks_equal_full_forward(kernels_on):
    seqs = Seqs(_model(16), [80])
    parts = [seqs.step([(0, n)], 0)[0] for n in (30, 50)]
    _close(torch.cat(parts), seqs.reference(0))
    assert kernels_on["prefill_sparse"] > 0


def test_decodes_below_and_above_topk_equal_full_forward(kernels_on):
    lengths = [6, 20, 33]
    seqs = Seqs(_model(8, seed=1), lengths)
    outs = {s: seqs.step([(s, n - 2)], 0) for s, n in enumerate(lengths)}
    for _ in range(2):
        for s, h in enumerate(seqs.step([(0, 1), (1, 1), (2, 1)], 3)):
            outs[s].append(h)
    for s in range(3):
        _close(torch.cat(outs[s]), seqs.reference(s))
    assert kernels_on["decode"] > 0


def test_cpu_tensors_keep_the_pytorch_path():
    assert not kernels.available(torch.zeros(1))
