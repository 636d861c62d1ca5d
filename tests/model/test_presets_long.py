"""The ``tiny-128k`` preset: tiny's widths with V3.2's long-context settings (YaRN factor 40, top-k 2048)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.model.config import ConfigError, ModelConfig
from workers.model.presets import PRESETS, load_preset
from workers.model.rope import YarnRotary, yarn_inv_freq

DSASERVE = Path(sys.executable).parent / "dsaserve"
LAST = 131071  # the last position of a 128K (131,072-token) context


def test_listed_and_loadable():
    assert "tiny-128k" in PRESETS
    assert load_preset("tiny-128k") is PRESETS["tiny-128k"]
    with pytest.raises(ConfigError, match="tiny-128k"):  # the unknown-preset message lists it
        load_preset("no-such-preset")


def test_reaches_128k_with_v32_yarn_and_topk():
    c = load_preset("tiny-128k")
    assert c.max_position_embeddings >= 131072 and c.max_position_embeddings == 163840
    rs = c.rope_scaling
    assert rs is not None and rs.is_yarn
    assert (rs.factor, rs.original_max_position_embeddings, rs.beta_fast, rs.beta_slow, rs.mscale, rs.mscale_all_dim) == (
        40.0, 4096, 32.0, 1.0, 1.0, 1.0)
    assert rs.original_max_position_embeddings * rs.factor == c.max_position_embeddings
    assert c.index_topk == 2048


def test_keeps_tiny_widths():
    tiny, long = PRESETS["tiny"], PRESETS["tiny-128k"]
    differing = {f.name for f in dataclasses.fields(ModelConfig) if getattr(tiny, f.name) != getattr(long, f.name)}
    assert differing == {"index_topk", "max_position_embeddings", "rope_scaling"}


def test_config_round_trips_through_hf_json():
    c = PRESETS["tiny-128k"]
    hf = json.loads(json.dumps(c.to_hf()))
    assert hf["rope_scaling"]["type"] == "yarn" and hf["rope_scaling"]["factor"] == 40.0
    assert ModelConfig.from_hf(hf) == c


def test_softmax_scale_has_yarn_mscale():
    c = PRESETS["tiny-128k"]
    m = 0.1 * math.log(40.0) + 1.0
    assert c.softmax_scale == pytest.approx(c.qk_head_dim**-0.5 * m * m)


def test_rotary_at_position_131071_is_finite():
    c = PRESETS["tiny-128k"]
    rotary = YarnRotary(c.qk_rope_head_dim, c.rope_theta, c.rope_scaling)
    positions = torch.tensor([[0, 4095, 131070, LAST]])
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = rotary.cos_sin(positions, dtype)
        assert cos.shape == sin.shape == (1, 4, c.qk_rope_head_dim // 2)
        assert torch.isfinite(cos).all() and torch.isfinite(sin).all()
    cos, sin = rotary.cos_sin(positions, torch.float32)
    # attention_factor is 1 (mscale == mscale_all_dim): unit-norm rotations at every position.
    torch.testing.assert_close(cos**2 + sin**2, torch.ones_like(cos), atol=1e-5, rtol=0)
    assert rotary.attention_factor == 1.0


def test_yarn_interpolates_the_low_frequencies_by_40():
    c = PRESETS["tiny-128k"]
    plain = yarn_inv_freq(c.qk_rope_head_dim, c.rope_theta, None)
    yarn = yarn_inv_freq(c.qk_rope_head_dim, c.rope_theta, c.rope_scaling)
    assert yarn[0] == plain[0]  # the fastest rotation is kept (extrapolated)
    assert yarn[-1] == pytest.approx(plain[-1] / 40.0)  # the slowest is interpolated by the factor
    # So the slowest dimension turns through less than one period over 131072 positions' worth.
    assert float(yarn[-1]) * LAST < 2 * math.pi


@pytest.mark.slow
def test_model_init_writes_the_preset(tmp_path):
    out = tmp_path / "ckpt"
    done = subprocess.run([str(DSASERVE), "model", "init", str(out), "--preset", "tiny-128k"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert ModelConfig.from_hf(out) == PRESETS["tiny-128k"]
