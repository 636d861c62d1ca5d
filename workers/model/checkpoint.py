"""Load a Hugging Face DeepSeek-V3.2 checkpoint into ``DeepseekV32``.

Layout read: ``config.json`` plus either one ``model.safetensors`` or shards listed by
``model.safetensors.index.json`` (``{"metadata": ..., "weight_map": {hf_name: file}}``) — DeepSeek's
releases (FP8 weights with ``.weight_scale_inv``) and transformers' ``save_pretrained`` output alike.

Everything is checked from the safetensors headers before any weight is read, so a broken checkpoint
fails fast with a message naming the tensor. Weights are then read one at a time from memory-mapped
files, dequantized/cast or copied, and assigned into a model built on the meta device: the checkpoint
is never held twice in RAM.

Every weight ends up in memory the process owns (device memory on a GPU; anonymous memory on the CPU),
never as a view of the file mapping, even where its dtype is the checkpoint's: a server must not depend
on its checkpoint file once loaded (a file replaced or truncated under a mapping kills the process with
SIGBUS, e.g. a rolling upgrade rewriting a shared volume), and mapped pages are dropped under memory
pressure and read back from disk in the middle of a decode step. The mapping's pages stay in the page
cache only as reclaimable cache.

FP8 weights either stay FP8 (``fp8_weights="resident"``, the default: each FP8 projection becomes an
``FP8Linear`` holding the e4m3 weight and its block scales, dequantized tile by tile at use) or are
dequantized into ``dtype`` here (``"dequantize"``: the reference, and what transformers computes).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import safe_open

from workers.model.config import ModelConfig
from workers.model.fp8 import FP8Linear, dequantize_weight, scale_shape
from workers.model.names import SCALE_SUFFIX, hf_to_internal, internal_to_hf, routed_expert_of, scale_name
from workers.model.shards import FP8_DTYPE_NAME, CheckpointError, TensorInfo, checkpoint_tensors

if TYPE_CHECKING:
    from workers.model.model import DeepseekV32

FLOAT_DTYPE_NAMES = frozenset({FP8_DTYPE_NAME, "BF16", "F16", "F32", "F64"})
DEFAULT_BLOCK = (128, 128)
PROGRESS_THRESHOLD_BYTES = 2**30
# Routing is decided by a sum with this bias; bf16 rounding would change which experts win.
FP32_INTERNAL_SUFFIXES = ("ffn.gate.bias",)
FP8Weights = Literal["resident", "dequantize"]
FP8_WEIGHTS = ("resident", "dequantize")


@dataclass(frozen=True)
class _Load:
    internal: str
    weight: TensorInfo
    scale: TensorInfo | None


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    load_mtp: bool = False,
    progress: bool | None = None,
    indexer: str | None = None,
    experts: Callable[[int, int], bool] | None = None,
    fp8_weights: FP8Weights = "resident",
) -> "DeepseekV32":
    """Build ``DeepseekV32`` from a checkpoint folder.

    Args:
        path: folder with ``config.json`` and safetensors weights.
        dtype: floating dtype of the weights (FP8 weights are dequantized into it); the MoE gate's
            correction bias always stays float32.
        device: where the weights end up (each tensor is moved as it is read).
        load_mtp: also load the multi-token-prediction layers (``model.layers.{N+j}``); when False
            they are skipped, present or not.
        progress: progress line on stderr; None = only for checkpoints over 1 GiB.
        indexer: ``"exact"`` or ``"fp8"``; None = exact in float32 (what transformers computes),
            DeepSeek's FP8 indexer otherwise.
        experts: ``(layer, expert) → bool``, the routed experts to load (an expert-parallel rank's
            share, ``ExpertPlacement.holds(rank)``); None = all. The others are never read: their
            slots hold ``AbsentExpert`` placeholders. Their headers are still checked (MTP layer j is
            layer ``num_hidden_layers + j``).
        fp8_weights: what happens to the checkpoint's FP8 weights (others load as ``dtype`` either
            way). ``"resident"``: they stay float8_e4m3fn with their float32 block scales, as
            ``FP8Linear`` modules computing in the activations' dtype (``dtype``), so the model holds
            about the checkpoint's bytes. ``"dequantize"``: expanded into ``dtype`` at load (plain
            ``nn.Linear``; the reference path).

    Raises:
        ConfigError: ``config.json`` missing or invalid (names the key).
        CheckpointError: missing, unexpected or mis-shaped tensor, FP8 weight without its scale, scale
            of the wrong shape (names the tensor).
    """
    from workers.model.model import DeepseekV32
    from workers.model.moe import AbsentExpert

    if not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(f"dtype must be a 16/32/64-bit float dtype, got {dtype}")
    if fp8_weights not in FP8_WEIGHTS:
        raise ValueError(f"fp8_weights must be one of {FP8_WEIGHTS}, got {fp8_weights!r}")
    root = Path(path)
    config = ModelConfig.from_hf(root)
    if load_mtp and config.num_nextn_predict_layers == 0:
        raise CheckpointError(f"load_mtp=True but {root / 'config.json'} has num_nextn_predict_layers = 0")
    tensors = checkpoint_tensors(root)
    with torch.device("meta"):
        model = DeepseekV32(config, with_mtp=load_mtp)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    plan = _plan(config, tensors, expected, load_mtp)
    if experts is not None:
        layers = config.num_hidden_layers

        def skipped(internal: str) -> tuple[int, int] | None:
            which = routed_expert_of(internal, layers)
            return which if which is not None and not experts(*which) else None

        plan = [p for p in plan if skipped(p.internal) is None]
        for layer, e in {w for name in expected if (w := skipped(name)) is not None}:
            block_module = model.layers[layer] if layer < layers else model.mtp[layer - layers].block
            block_module.ffn.experts[e] = AbsentExpert(layer, e)

    block = _block(config)
    resident = fp8_weights == "resident"
    if resident:
        _fp8_modules(model, [p.internal for p in plan if p.scale is not None], block)
    total_bytes = sum(p.weight.nbytes + (p.scale.nbytes if p.scale else 0) for p in plan)
    show = total_bytes > PROGRESS_THRESHOLD_BYTES if progress is None else progress
    state: dict[str, torch.Tensor] = {}
    with ExitStack() as stack, _Progress(len(plan), show) as bar:
        handles: dict[Path, Any] = {}

        def read(info: TensorInfo) -> torch.Tensor:
            if info.file not in handles:
                handles[info.file] = stack.enter_context(safe_open(str(info.file), framework="pt", device="cpu"))
            return handles[info.file].get_tensor(info.name)

        for item in plan:
            target = torch.float32 if item.internal.endswith(FP32_INTERNAL_SUFFIXES) else dtype
            mapped = read(item.weight)
            weight = mapped.to(device)
            if item.scale is not None and resident:
                state[item.internal] = _owned(weight, mapped)
                scale = read(item.scale)
                state[item.internal + "_scale_inv"] = _owned(scale.to(device, torch.float32), scale)
                bar.update()
                continue
            if item.scale is not None:
                weight = dequantize_weight(weight, read(item.scale).to(device), block, target)
            state[item.internal] = _owned(weight.to(target), mapped)
            bar.update()
    model.load_state_dict(state, strict=True, assign=True)
    model.configure(indexer=indexer or ("exact" if dtype == torch.float32 else "fp8"))
    return model.eval()


def _owned(t: torch.Tensor, mapped: torch.Tensor) -> torch.Tensor:
    """``t``, copied when it still shares memory with ``mapped`` (a view of the checkpoint's mapping:
    ``.to()`` to the same device and dtype returns its input)."""
    if t.device == mapped.device and t.untyped_storage().data_ptr() == mapped.untyped_storage().data_ptr():
        return t.clone()
    return t


def _fp8_modules(model: "DeepseekV32", weights: list[str], block: tuple[int, int]) -> None:
    """Replace the ``nn.Linear`` owning each internal ``….weight`` name by an ``FP8Linear`` (on meta)."""
    for name in weights:
        path, _, leaf = name.removesuffix(".weight").rpartition(".")
        parent = model.get_submodule(path)
        linear = getattr(parent, leaf)
        if not isinstance(linear, torch.nn.Linear) or linear.bias is not None:
            raise CheckpointError(f"FP8 tensor {name!r} does not belong to a bias-free linear layer")
        setattr(parent, leaf, FP8Linear(linear.in_features, linear.out_features, block, device="meta"))


def _plan(
    config: ModelConfig, tensors: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]], load_mtp: bool
) -> list[_Load]:
    """Match checkpoint tensors to the model's state, or raise naming the first problem."""
    block = _block(config)
    layers = config.num_hidden_layers
    problems: list[str] = []
    loads: dict[str, _Load] = {}
    seen: set[str] = set()  # internal names present in the file, loadable or not
    for name, info in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            weight = tensors.get(name[: -len(SCALE_SUFFIX)] + ".weight")
            if weight is None:
                problems.append(f"unexpected tensor {name!r}: a scale without its weight")
            elif weight.dtype != FP8_DTYPE_NAME:
                problems.append(f"unexpected tensor {name!r}: its weight is {weight.dtype}, not FP8")
            continue
        internal = hf_to_internal(name, layers)
        if internal is None:
            problems.append(f"unexpected tensor {name!r}: not a DeepSeek-V3.2 tensor name")
            continue
        if internal.startswith("mtp.") and not load_mtp and _mtp_index(internal) < config.num_nextn_predict_layers:
            continue
        if internal not in expected:
            problems.append(f"unexpected tensor {name!r} (internal {internal!r}): not part of a model with this config")
            continue
        seen.add(internal)
        if info.dtype not in FLOAT_DTYPE_NAMES:
            problems.append(f"tensor {name!r}: unsupported dtype {info.dtype}")
            continue
        if info.shape != expected[internal]:
            problems.append(f"tensor {name!r}: expected shape {list(expected[internal])}, got {list(info.shape)}")
            continue
        scale = None
        if info.dtype == FP8_DTYPE_NAME:
            scale = tensors.get(scale_name(name))
            if scale is None:
                problems.append(f"tensor {name!r} is FP8 but its scale {scale_name(name)!r} is missing")
                continue
            want = scale_shape(info.shape, block)
            if scale.shape != want:
                problems.append(
                    f"tensor {scale.name!r}: expected shape {list(want)} (weight {list(info.shape)}, "
                    f"block {list(block)}), got {list(scale.shape)}"
                )
                continue
        loads[internal] = _Load(internal, info, scale)
    for internal, shape in expected.items():
        if internal not in seen:
            problems.append(f"missing tensor {_hf_name(internal, layers)!r} (expected shape {list(shape)})")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)
    # Read in on-disk order: sequential access over memory-mapped shards.
    return sorted(loads.values(), key=lambda p: (str(p.weight.file), p.weight.offset))


def _block(config: ModelConfig) -> tuple[int, int]:
    return config.quantization_config.weight_block_size if config.quantization_config else DEFAULT_BLOCK


def _mtp_index(internal: str) -> int:
    return int(internal.split(".")[1])


def _hf_name(internal: str, num_hidden_layers: int) -> str:
    try:
        return internal_to_hf(internal, num_hidden_layers)
    except KeyError:
        return internal


class _Progress:
    """Tensors-loaded counter on stderr: tqdm when installed, a plain ``\\r`` line otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.done = total, enabled, 0
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc="loading", unit="tensor", file=sys.stderr)

    def __enter__(self) -> "_Progress":
        return self

    def update(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update()
        elif self.enabled and (self.done == self.total or self.done % max(1, self.total // 100) == 0):
            print(f"\rloading {self.done}/{self.total} tensors", end="", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr)
