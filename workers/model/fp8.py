"""Block FP8 (e4m3) weight quantization, as DeepSeek ships its checkpoints.

A weight ``W [out, in]`` is cut into blocks of ``block = (bo, bi)`` (128 × 128 in the release); each block
gets one fp32 ``scale_inv`` and its values are stored as ``float8_e4m3fn``:

    W[bo·i : bo·(i+1), bi·j : bi·(j+1)] ≈ W8[same block] · scale_inv[i, j]

Edges that are not a multiple of the block are partial blocks (576 rows → 5 row blocks, the last one
holding 64 rows), so ``scale_inv`` is ``[ceil(out/bo), ceil(in/bi)]``.

``FP8Linear`` computes with such a weight without expanding it for good (``load_model``'s default for
FP8 checkpoints); ``dequantize_weight`` is its reference and the dequantize-at-load path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


# Dequantized elements one per-call tile may hold (64 MiB in fp32): bounds the transient copy of a large weight.
_TILE_ELEMENTS = 1 << 24


class FP8Linear(nn.Module):
    """``y = x · dequant(W)ᵀ`` with ``W`` kept as the checkpoint stores it: resident memory stays FP8.

    Holds ``weight`` float8_e4m3fn ``[out, in]`` and ``weight_scale_inv`` float32
    ``[ceil(out/bo), ceil(in/bi)]`` (state-dict names as in the checkpoint, so a loaded model's
    ``state_dict`` is the FP8 one). x: ``[..., in]`` → ``[..., out]`` in x's dtype.

    - Reference (every device): dequantize a tile of rows into x's dtype, multiply, drop it. Equal to
      ``F.linear(x, dequantize_weight(W8, scale_inv, block, x.dtype))``, bit for bit, since both
      dequantize in float32 and round once.
    - CUDA: ``torch._scaled_mm`` with 1×128 activation and 128×128 weight block scales, where this
      torch/GPU accepts them (tried on the first call, checked against the reference, else the
      reference is used from then on). Activations are quantized to e4m3 per 128 values, so results
      differ from the reference by FP8 rounding of x.
    """

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int] = (128, 128), device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        w8 = torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device)
        self.weight = nn.Parameter(w8, requires_grad=False)
        scales = scale_shape((out_features, in_features), self.block)
        self.register_buffer("weight_scale_inv", torch.empty(scales, dtype=torch.float32, device=device))
        self.scaled_mm: bool | None = None  # None: not tried yet; set on the first CUDA call

    @classmethod
    def from_weight(cls, w8: Tensor, scale_inv: Tensor, block: tuple[int, int] = (128, 128)) -> "FP8Linear":
        """Wrap an already quantized weight (``quantize_weight``'s output)."""
        layer = cls(w8.shape[1], w8.shape[0], block, device="meta")
        layer.weight = nn.Parameter(w8.to(FP8_DTYPE), requires_grad=False)
        layer.weight_scale_inv = scale_inv.float()
        return layer

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """The whole weight in ``dtype``, ``[out, in]`` (a fresh tensor: the caller drops it)."""
        return dequantize_weight(self.weight, self.weight_scale_inv, self.block, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and self.scaled_mm is not False:
            y = self._try_scaled_mm(x)
            if y is not None:
                return y
        return self.forward_reference(x)

    def forward_reference(self, x: Tensor) -> Tensor:
        """Dequantize-per-call path. x: ``[..., in]`` → ``[..., out]``."""
        bo = self.block[0]
        rows = max(bo, _TILE_ELEMENTS // max(1, self.in_features) // bo * bo)  # whole row blocks per tile
        if rows >= self.out_features:
            return F.linear(x, self.dequantized(x.dtype))
        parts = []
        for r0 in range(0, self.out_features, rows):
            r1 = min(self.out_features, r0 + rows)
            scale = self.weight_scale_inv[r0 // bo : -(-r1 // bo)]
            w = dequantize_weight(self.weight[r0:r1], scale, self.block, x.dtype)
            parts.append(F.linear(x, w))
        return torch.cat(parts, dim=-1)

    def _try_scaled_mm(self, x: Tensor) -> Tensor | None:
        """The ``_scaled_mm`` path, or None where it does not apply. Its first call is checked against
        the reference: a torch/GPU that rejects or mis-reads 128×128 scales falls back for good."""
        k = self.in_features
        if x.numel() == 0:
            return None  # nothing to multiply: the reference handles it without deciding anything
        supported = self.block == (128, 128) and k % 128 == 0 and x.dtype in (torch.bfloat16, torch.float32)
        if not supported or not hasattr(torch, "_scaled_mm"):
            self.scaled_mm = False
            return None
        try:
            y = _scaled_mm_blockwise(x, self.weight, self.weight_scale_inv)
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            self.scaled_mm = False
            return None
        if self.scaled_mm is None:
            ref = self.forward_reference(x).float()
            err = (y.float() - ref).norm() / ref.norm().clamp_min(1e-6)
            self.scaled_mm = bool(err < 0.05)  # e4m3 activations: ~1e-2 relative; a wrong layout is O(1)
            return y if self.scaled_mm else ref.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}"


def _scaled_mm_blockwise(x: Tensor, w8: Tensor, scale_inv: Tensor) -> Tensor:
    """x ``[..., K]`` (K % 128 == 0), w8 e4m3 ``[N, K]``, scale_inv ``[ceil(N/128), K/128]`` → ``[..., N]``
    in x's dtype, via ``torch._scaled_mm`` with per-token 1×128 activation scales (dynamic, as
    DeepSeek's ``act_quant``) and 128×128 weight scales."""
    shape = x.shape
    a = x.reshape(-1, shape[-1]).float()
    groups = a.reshape(a.shape[0], -1, 128)
    a_scale = groups.abs().amax(dim=-1).clamp_min(AMAX_FLOOR) / FP8_MAX  # [M, K/128]
    a8 = (groups / a_scale[..., None]).clamp(-FP8_MAX, FP8_MAX).reshape(a.shape).to(FP8_DTYPE)
    # 1×128 scales must be outer-dim-major; the weight operand is column-major (w8ᵀ of a row-major [N, K]).
    a_scale = a_scale.t().contiguous().t()
    out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    y = torch._scaled_mm(a8, w8.t(), scale_a=a_scale, scale_b=scale_inv.t(), out_dtype=out_dtype)
    return y.reshape(*shape[:-1], w8.shape[0]).to(x.dtype)


def dense_weight(linear: nn.Module, dtype: torch.dtype) -> Tensor:
    """The ``[out, in]`` weight of an ``nn.Linear`` (as held) or an ``FP8Linear`` (dequantized into ``dtype``)."""
    return linear.dequantized(dtype) if isinstance(linear, FP8Linear) else linear.weight
