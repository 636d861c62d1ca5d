"""A checkpoint folder's safetensors files, read from their headers only (no torch, no weights).

``checkpoint_tensors`` lists every tensor of a folder holding one ``model.safetensors`` or shards named by
``model.safetensors.index.json``, with dtype, shape and size: enough to validate a checkpoint against a
config, count parameters or plan loading before reading a byte of weights.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FP8_DTYPE_NAME = "F8_E4M3"
# safetensors caps headers at 100 MB; a larger length means the file is not safetensors.
MAX_HEADER_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint does not match its config; the message names the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it (no data read)."""

    name: str
    file: Path
    dtype: str  # safetensors dtype name: "F8_E4M3", "BF16", "F32", ...
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # start of the data after the header; reading in offset order is sequential

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Tensor name → TensorInfo for one ``.safetensors`` file, from its JSON header only.

    Format: 8-byte little-endian header length, then a JSON object
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``.
    """
    try:
        with open(file, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > MAX_HEADER_BYTES:
                raise ValueError(f"header length {size} is implausible")
            header = json.loads(fh.read(size))
        out: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            shape = tuple(int(d) for d in entry["shape"])
            out[name] = TensorInfo(name, file, str(entry["dtype"]), shape, end - begin, begin)
    except (OSError, struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e!r})") from None
    return out


def checkpoint_tensors(path: str | Path) -> dict[str, TensorInfo]:
    """HF tensor name → TensorInfo for a checkpoint folder (single file or index + shards)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
        headers: dict[str, dict[str, TensorInfo]] = {}
        out: dict[str, TensorInfo] = {}
        for name, file in weight_map.items():
            if file not in headers:
                if not (root / file).is_file():
                    raise CheckpointError(f"tensor {name!r}: its shard {file!r} is missing from {root}")
                headers[file] = read_safetensors_header(root / file)
            if name not in headers[file]:
                raise CheckpointError(f"tensor {name!r}: listed in {INDEX_FILE} but not found in {file!r}")
            out[name] = headers[file][name]
        return out
    if (root / SINGLE_FILE).is_file():
        return read_safetensors_header(root / SINGLE_FILE)
    raise CheckpointError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE}")
