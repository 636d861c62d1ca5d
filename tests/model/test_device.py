"""``resolve_dtype``: the names map to torch dtypes, ``auto`` picks bfloat16 only where it is fast, a bad
name is an error naming the field; ``cpu_has_fast_bf16`` reads the flags of a real-format cpuinfo."""

from __future__ import annotations

import pytest
import torch

from workers.model import device
from workers.model.device import DTYPE_CHOICES, cpu_has_fast_bf16, dtype_name, resolve_dtype

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme de pse tsc msr sse sse2 avx avx2 {extra}
bugs\t\t: spectre_v1 spectre_v2

processor\t: 1
flags\t\t: fpu vme de pse tsc msr sse sse2 avx avx2 {extra}
"""


@pytest.mark.parametrize(
    ("extra", "fast"),
    [("avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True), ("avx512f avx512_vnni", False), ("", False)],
    ids=["avx512-bf16", "amx", "avx512-without-bf16", "avx2-only"],
)
def test_cpu_flags_decide(tmp_path, extra, fast):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(extra=extra))
    assert cpu_has_fast_bf16(path) is fast


def test_no_cpuinfo_means_no_fast_bf16(tmp_path):
    assert cpu_has_fast_bf16(tmp_path / "absent") is False
    (tmp_path / "no-flags").write_text("processor\t: 0\nFeatures\t: fp asimd\n")  # e.g. an ARM board
    assert cpu_has_fast_bf16(tmp_path / "no-flags") is False


@pytest.mark.parametrize("fast", [True, False], ids=["bf16-cpu", "avx2-cpu"])
def test_explicit_names_ignore_the_machine(monkeypatch, fast):
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: fast)
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16


def test_auto_on_cpu_follows_the_flags(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype("auto") is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) is torch.bfloat16
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") is torch.float32


def test_auto_on_cuda_needs_native_bf16(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)  # the host CPU does not count
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto", "cuda") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # A pre-Ampere GPU only emulates bf16: is_bf16_supported is True only when emulation counts.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_dtype("auto", "cuda:0") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16


def test_auto_elsewhere_is_float32(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype("auto", "meta") is torch.float32


@pytest.mark.parametrize("name", ["fp16", "float16", "bf16", "Auto", ""])
def test_unknown_names_are_rejected_naming_the_field(name):
    with pytest.raises(ValueError, match=r"^dtype must be one of auto, float32, bfloat16; got ") as e:
        resolve_dtype(name)
    assert repr(name) in str(e.value)


def test_choices_and_names_round_trip():
    assert DTYPE_CHOICES == ("auto", "float32", "bfloat16")
    for name in DTYPE_CHOICES[1:]:
        assert dtype_name(resolve_dtype(name)) == name
