"""Rotary position embedding with YaRN context extension.

MLA rotates *interleaved* pairs (x0,x1),(x2,x3)… (GPT-J style); the lightning indexer rotates
*half-split* pairs (x_i, x_{i+d/2}) (NeoX style). Both share one frequency table.
"""

from __future__ import annotations

import math

import torch

from .config import RopeScaling


def yarn_inv_freq(rope_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies ``f_i`` for ``i < rope_dim/2``, YaRN-blended when ``scaling`` extends context.

    Returns: float32 [rope_dim // 2].
    """
    # device="cpu" explicitly: the model may be built under a meta-device context, the table may not.
    inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32, device="cpu") / rope_dim))
    if scaling is None or not scaling.is_yarn:
        return inv_freq

    def correction_dim(rotations: float) -> float:
        return rope_dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta)
        )

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1 = keep the original (extrapolated) frequency, 0 = interpolate by `factor`
    return inv_freq / scaling.factor * (1 - keep) + inv_freq * keep


def yarn_attention_factor(scaling: RopeScaling | None) -> float:
    """Scale folded into cos/sin (1.0 for DeepSeek's released configs, where mscale == mscale_all_dim)."""
    if scaling is None or not scaling.is_yarn:
        return 1.0

    def m(value: float) -> float:
        return 0.1 * value * math.log(scaling.factor) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return m(scaling.mscale) / m(scaling.mscale_all_dim)
    return m(1.0)


class YarnRotary:
    """Cos/sin tables for absolute positions; no state besides the frequency vector.

    Kept out of ``nn.Module`` buffers so a model built on the meta device needs only its weights.
    """

    def __init__(self, rope_dim: int, theta: float, scaling: RopeScaling | None) -> None:
        self.rope_dim = rope_dim
        self.inv_freq = yarn_inv_freq(rope_dim, theta, scaling)
        self.attention_factor = yarn_attention_factor(scaling)
        self._on_device: dict[torch.device, torch.Tensor] = {}  # inv_freq copied once per device

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        # A copy from host memory in every step would be a host sync, and cannot be captured in a CUDA graph.
        if device not in self._on_device:
            self._on_device[device] = self.inv_freq.to(device)
        return self._on_device[device]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: Long [B, S] → (cos, sin), each [B, S, rope_dim/2] in ``dtype``."""
        inv_freq = self._inv_freq(positions.device)
        angles = positions.to(torch.float32)[..., None] * inv_freq
        cos = angles.cos() * self.attention_factor
        sin = angles.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs. x: [B, S, H, d] (or [B, S, d]); cos/sin: [B, S, d/2]."""
    if x.dim() == cos.dim() + 1:
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)


def apply_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate half-split pairs (x_i, x_{i+d/2}). x: [B, S, H, d] (or [B, S, d]); cos/sin: [B, S, d/2]."""
    if x.dim() == cos.dim() + 1:
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    x0, x1 = x[..., :half], x[..., half:]
    return torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
