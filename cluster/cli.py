"""``dsaserve`` command line: one small function per subcommand, registered on an argparse tree.

    dsaserve model init OUT_DIR --preset tiny|small|FILE.json [--fp8] [--seed N] [--max-shard-mb M]
    dsaserve model info PATH [--dtype bfloat16|float32|float8] [--json]
    dsaserve local | generate | client generate | batch      (cluster/cli_serve.py)
    dsaserve serve --config FILE | status                     (cluster/cli_cluster.py)
    dsaserve tls-front --listen H:P --upstream H:P --tls-cert F --tls-key F   (cluster/cli_tls.py)

Errors a user can fix (bad config, broken checkpoint, bad argument) exit with status 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Torch-free imports only: `model info` and argument errors answer without loading torch.
from workers.model.config import ConfigError, ModelConfig
from workers.model.names import SCALE_SUFFIX, hf_to_internal
from workers.model.shards import FP8_DTYPE_NAME, CheckpointError, TensorInfo, checkpoint_tensors
from cluster.cli_args import positive_int

KV_DTYPE_BYTES = {"bfloat16": 2, "float32": 4, "float8": 1}
INDEXER_FP8_SCALE_BYTES = 4  # one fp32 scale per cached indexer key


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dsaserve`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2, already reported)
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, CheckpointError) as e:
        print(f"dsaserve: error: {e}", file=sys.stderr)
        return 2


class _Parser(argparse.ArgumentParser):
    """Reports a bad argument as one line (argparse would print the whole usage first)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsaserve", description="Serve DeepSeek-V3.2 models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_model_commands(commands)
    from cluster import cli_cluster, cli_serve  # after the torch-free imports above: still no torch

    cli_serve.register(commands)
    cli_cluster.register(commands)
    from cluster import cli_k8s
    cli_k8s.register(commands)
    return parser


def add_model_commands(commands: Any) -> None:
    """``dsaserve model {init,info}``."""
    model = commands.add_parser("model", help="create or inspect checkpoints")
    sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")

    init = sub.add_parser("init", help="write a random checkpoint in the real layout, with the tokenizer")
    init.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    init.add_argument("--preset", default="tiny", help="tiny, small, or a HF config FILE.json (default: tiny)")
    init.add_argument("--fp8", action="store_true", help="store projections as block FP8, as DeepSeek ships them")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--max-shard-mb", type=positive_int, default=1024, help="shard size limit (default: 1024)")
    init.set_defaults(func=cmd_model_init)

    info = sub.add_parser("info", help="config, parameter counts and KV bytes per token (reads headers only)")
    info.add_argument("path", metavar="PATH", type=Path)
    info.add_argument("--dtype", choices=sorted(KV_DTYPE_BYTES), default="bfloat16", help="KV cache dtype")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_model_info)


def cmd_model_init(args: argparse.Namespace) -> int:
    from workers.model.presets import load_preset

    config = load_preset(args.preset)  # before importing torch: a bad preset answers at once
    from workers.model.writer import check_out_dir, copy_tokenizer, random_state_dict, write_checkpoint

    check_out_dir(args.out_dir)
    tokenizer = copy_tokenizer(args.out_dir)
    state = random_state_dict(config, with_mtp=True, seed=args.seed)
    files = write_checkpoint(args.out_dir, config, state, fp8=args.fp8, max_shard_bytes=args.max_shard_mb * 2**20)
    del state
    files += tokenizer
    params = sum(t.numel for t in checkpoint_tensors(args.out_dir).values() if not t.name.endswith(SCALE_SUFFIX))
    print(f"wrote {args.out_dir} ({'fp8' if args.fp8 else 'bf16'}, {params:,} parameters, seed {args.seed}):")
    for f in files:
        print(f"  {f.name:<40} {_human_bytes(f.stat().st_size):>10}")
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    config = ModelConfig.from_hf(args.path)
    tensors = checkpoint_tensors(args.path)
    report = {
        "path": str(args.path),
        "config": config.to_hf(),
        "params": param_counts(config, tensors),
        "kv_bytes_per_token": kv_bytes_per_token(config, args.dtype),
        "resident_weight_bytes": resident_weight_bytes(config, tensors),
        "checkpoint": {
            "files": len({t.file for t in tensors.values()}),
            "bytes": sum(t.nbytes for t in tensors.values()),
            "fp8": any(t.dtype == FP8_DTYPE_NAME for t in tensors.values()),
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_info(report)
    return 0


def param_counts(config: ModelConfig, tensors: dict[str, TensorInfo]) -> dict[str, int]:
    """Parameter counts from tensor headers (FP8 scales excluded).

    ``total`` = everything in the checkpoint (main model + MTP); ``main`` excludes MTP;
    ``activated_per_token`` = main model with only ``num_experts_per_tok`` of the routed experts of
    each MoE layer (dense, attention, shared experts, embedding and head count fully).
    """
    counts = {"total": 0, "main": 0, "mtp": 0, "embedding_and_head": 0, "routed_experts": 0}
    for name, info in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        internal = hf_to_internal(name, config.num_hidden_layers) or name
        counts["total"] += info.numel
        if internal.startswith("mtp."):
            counts["mtp"] += info.numel
            continue
        counts["main"] += info.numel
        if internal in ("embed.weight", "head.weight"):
            counts["embedding_and_head"] += info.numel
        elif ".ffn.experts." in internal:
            counts["routed_experts"] += info.numel
    routed_active = counts["routed_experts"] * config.num_experts_per_tok // config.n_routed_experts
    counts["activated_per_token"] = counts["main"] - counts["routed_experts"] + routed_active
    return counts


def resident_weight_bytes(config: ModelConfig, tensors: dict[str, TensorInfo]) -> dict[str, int]:
    """Bytes the main model's weights (MTP excluded) take once loaded: in float32, in bfloat16, and as
    stored (``checkpoint``: FP8 weights kept resident stay FP8 with their fp32 block scales; the MoE
    gate's correction bias is float32 in every case)."""
    out = {"float32": 0, "bfloat16": 0, "checkpoint": 0}
    for name, info in tensors.items():
        internal = hf_to_internal(name, config.num_hidden_layers) or name
        if internal.startswith("mtp."):
            continue
        out["checkpoint"] += info.nbytes
        if not name.endswith(SCALE_SUFFIX):
            out["float32"] += info.numel * 4
            out["bfloat16"] += info.numel * 2
    return out


def kv_bytes_per_token(config: ModelConfig, dtype: str) -> dict[str, Any]:
    """Cache bytes per token over the decoder layers (MTP excluded) for a KV ``dtype``.

    ``latent``: MLA's c_kv + roped k_pe per layer; ``indexer``: the lightning indexer's key per layer
    (FP8 values plus one fp32 scale when ``dtype`` is float8). An FP8 latent is stored as DeepSeek's
    sparse kernels read it: c_kv in e4m3 with one fp32 scale per 128 values, k_pe kept in bf16
    (656 bytes per token and layer for V3.2).
    """
    size = KV_DTYPE_BYTES[dtype]
    layers = config.num_hidden_layers
    latent = layers * config.latent_dim * size
    if dtype == "float8":
        scales = -(-config.kv_lora_rank // 128) * 4
        latent = layers * (config.kv_lora_rank + scales + config.qk_rope_head_dim * KV_DTYPE_BYTES["bfloat16"])
        indexer = layers * (config.index_head_dim + INDEXER_FP8_SCALE_BYTES)
    else:
        indexer = layers * config.index_head_dim * size
    return {"dtype": dtype, "latent": latent, "indexer": indexer, "total": latent + indexer}


def _print_info(report: dict[str, Any]) -> None:
    print(f"checkpoint  {report['path']}")
    ck = report["checkpoint"]
    print(f"  {ck['files']} file(s), {_human_bytes(ck['bytes'])}, {'FP8 block-quantized' if ck['fp8'] else 'no FP8'}")
    print("config")
    for key, value in report["config"].items():
        print(f"  {key:<28} {value}")
    print("parameters")
    for key, value in report["params"].items():
        print(f"  {key:<28} {value:>16,}")
    print("resident weight bytes")
    for key, value in report["resident_weight_bytes"].items():
        print(f"  {key:<28} {value:>16,}")
    kv = report["kv_bytes_per_token"]
    print(f"KV cache bytes per token ({kv['dtype']})")
    for key in ("latent", "indexer", "total"):
        print(f"  {key:<28} {kv[key]:>16,}")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


if __name__ == "__main__":
    sys.exit(main())
