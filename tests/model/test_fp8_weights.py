"""Block FP8 weight quantization: what DeepSeek's checkpoints store and how we expand it."""

import math

import pytest
import torch

from workers.model.fp8 import FP8_MAX, dequantize_weight, quantize_weight, scale_shape


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """[R, C] block scales → [out, in] per-element scale."""
    return scale.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


@pytest.mark.parametrize("shape", [(256, 384), (576, 200), (7, 130)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("block", [(128, 128), (64, 32)], ids=lambda b: f"block{b[0]}x{b[1]}")
@pytest.mark.parametrize("scale_fmt", ["ue8m0", None])
def test_roundtrip_within_e4m3_rounding(shape, block, scale_fmt):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    w8, scale = quantize_weight(w, block, scale_fmt)
    assert w8.dtype == torch.float8_e4m3fn and tuple(w8.shape) == shape
    assert scale.dtype == torch.float32 and tuple(scale.shape) == scale_shape(shape, block)
    back = dequantize_weight(w8, scale, block, torch.float32)
    assert back.dtype == torch.float32 and tuple(back.shape) == shape
    # e4m3 keeps 3 mantissa bits: relative error ≤ 2^-4 for normals, absolute 2^-10·scale for subnormals.
    bound = torch.maximum(w.abs() * 2**-4, _expand(scale, shape, block) * 2**-10)
    assert ((back - w).abs() <= bound * 1.0001).all()


def test_partial_edge_blocks_576x200():
    w = torch.randn(576, 200, generator=torch.Generator().manual_seed(1)) * 0.01
    w[512:, 128:] *= 100  # the bottom-right partial block alone holds large values
    w8, scale = quantize_weight(w, (128, 128))
    assert tuple(scale.shape) == (5, 2)
    assert scale[4, 1] > 50 * scale[4, 0] and scale[4, 1] > 50 * scale[3, 1]
    back = dequantize_weight(w8, scale, (128, 128), torch.float32)
    assert tuple(back.shape) == (576, 200)
    torch.testing.assert_close(back, w, rtol=2**-4, atol=scale.max().item() * 2**-10)


def test_ue8m0_scales_are_tight_powers_of_two():
    w = torch.randn(300, 260, generator=torch.Generator().manual_seed(2)) * torch.logspace(-3, 1, 260)
    w8, scale = quantize_weight(w, (128, 128), "ue8m0")
    exponents = torch.log2(scale)
    assert torch.equal(exponents, exponents.round())
    blocks = torch.nn.functional.pad(w.abs(), (0, 124, 0, 84)).reshape(3, 128, 3, 128).amax(dim=(1, 3))
    # 2^ceil(log2(amax/448)): the smallest power of two that keeps the block within ±448.
    assert (blocks / scale <= FP8_MAX).all() and (blocks / scale > FP8_MAX / 2).all()
    assert w8.float().abs().max() <= FP8_MAX


def test_plain_scale_is_amax_over_448():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(3))
    _, scale = quantize_weight(w, (128, 128), None)
    amax = w.abs().reshape(1, 128, 2, 128).amax(dim=(1, 3))
    torch.testing.assert_close(scale, amax / FP8_MAX)


def test_zero_block_gets_floor_scale_not_nan():
    w = torch.zeros(130, 10)
    w8, scale = quantize_weight(w, (128, 128))
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert math.log2(scale[0, 0].item()).is_integer()
    assert torch.equal(dequantize_weight(w8, scale, (128, 128), torch.float32), w)


def test_dequantize_into_bfloat16_is_exact_for_power_of_two_scales():
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(4))
    w8, scale = quantize_weight(w, (128, 128), "ue8m0")
    fp32 = dequantize_weight(w8, scale, (128, 128), torch.float32)
    bf16 = dequantize_weight(w8, scale, (128, 128), torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16.float(), fp32)


def test_dequantize_rejects_scale_of_wrong_shape():
    w8, scale = quantize_weight(torch.randn(576, 200), (128, 128))
    with pytest.raises(ValueError, match=r"expected \(5, 2\)"):
        dequantize_weight(w8, scale[:4], (128, 128), torch.float32)
