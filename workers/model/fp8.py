"""Block FP8 (e4m3) weight quantization, as DeepSeek ships its checkpoints.

A weight ``W [out, in]`` is cut into blocks of ``block = (bo, bi)`` (128 × 128 in the release); each block
gets one fp32 ``scale_inv`` and its values are stored as ``float8_e4m3fn``:

    W[bo·i : bo·(i+1), bi·j : bi·(j+1)] ≈ W8[same block] · scale_inv[i, j]

Edges that are not a multiple of the block are partial blocks (576 rows → 5 row blocks, the last one
holding 64 rows), so ``scale_inv`` is ``[ceil(out/bo), ceil(in/bi)]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Floor on a block's amax: an all-zero block would otherwise get scale 0 and divide by zero.
AMAX_FLOOR = 1e-4
SCALE_FORMATS = ("ue8m0", None)


def scale_shape(shape: tuple[int, ...] | torch.Size, block: tuple[int, int]) -> tuple[int, int]:
    """``[out, in]`` → ``[ceil(out/bo), ceil(in/bi)]``, the shape of a weight's ``scale_inv``."""
    if len(shape) != 2:
        raise ValueError(f"block FP8 applies to 2-D weights, got shape {tuple(shape)}")
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def _blocks(x: Tensor, block: tuple[int, int]) -> Tensor:
    """``[out, in]`` → zero-padded ``[out/bo, bo, in/bi, bi]`` view of the blocks (a copy when padding)."""
    bo, bi = block
    rows, cols = scale_shape(x.shape, block)
    pad_r, pad_c = rows * bo - x.shape[0], cols * bi - x.shape[1]
    if pad_r or pad_c:
        x = torch.nn.functional.pad(x, (0, pad_c, 0, pad_r))
    return x.reshape(rows, bo, cols, bi)


def _power_of_two_ceil(x: Tensor) -> Tensor:
    """``2^ceil(log2(x))`` for positive fp32 ``x``, exact (frexp instead of a rounded log2)."""
    mantissa, exponent = torch.frexp(x)
    # x = m·2^e with m in [0.5, 1): m == 0.5 means x is already 2^(e-1).
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(x), exponent)


def quantize_weight(
    w: Tensor, block: tuple[int, int] = (128, 128), scale_fmt: str | None = "ue8m0"
) -> tuple[Tensor, Tensor]:
    """Quantize a weight to block FP8.

    Args:
        w: ``[out, in]`` weight, any float dtype.
        block: ``(bo, bi)`` block shape.
        scale_fmt: ``"ue8m0"`` — each scale is a power of two, ``2^ceil(log2(amax/448))``, as in V3.2;
            ``None`` — ``amax/448``. ``amax`` is the block's max ``|w|``, floored at 1e-4.

    Returns:
        ``(w8, scale_inv)``: ``w8`` float8_e4m3fn ``[out, in]``; ``scale_inv`` float32
        ``[ceil(out/bo), ceil(in/bi)]`` such that ``w ≈ w8 · scale_inv`` blockwise.
    """
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FORMATS}, got {scale_fmt!r}")
    out_features, in_features = w.shape
    blocks = _blocks(w.float(), block)  # [R, bo, C, bi]
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(AMAX_FLOOR)  # [R, C]
    scale = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = _power_of_two_ceil(scale)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    w8 = q.reshape(q.shape[0] * q.shape[1], -1)[:out_features, :in_features].to(FP8_DTYPE)
    return w8.contiguous(), scale.contiguous()


def dequantize_weight(
    w8: Tensor, scale_inv: Tensor, block: tuple[int, int] = (128, 128), dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """Expand a block-FP8 weight back to ``dtype``.

    Args:
        w8: ``[out, in]`` float8_e4m3fn (any dtype works; it is upcast to fp32).
        scale_inv: ``[ceil(out/bo), ceil(in/bi)]`` block scales.
        block: ``(bo, bi)`` block shape the scales were computed with.
        dtype: dtype of the result.

    Returns:
        ``[out, in]`` tensor in ``dtype``: ``w8[block (i, j)] · scale_inv[i, j]``, computed in fp32.
    """
    expected = scale_shape(w8.shape, block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not fit weight {tuple(w8.shape)} "
            f"with block {tuple(block)}: expected {expected}"
        )
    out_features, in_features = w8.shape
    blocks = _blocks(w8.float(), block) * scale_inv.float()[:, None, :, None]
    w = blocks.reshape(blocks.shape[0] * blocks.shape[1], -1)[:out_features, :in_features]
    return w.to(dtype).contiguous()
