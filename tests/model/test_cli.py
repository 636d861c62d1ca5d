"""``dsaserve model init`` / ``dsaserve model info`` as a user runs them (real subprocesses)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from workers.model.model import DeepseekV32
from workers.model.presets import PRESETS

DSASERVE = Path(sys.executable).parent / "dsaserve"
SMALL_VOCAB = dataclasses.replace(PRESETS["tiny"], vocab_size=512)


def dsaserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(DSASERVE), *map(str, args)], capture_output=True, text=True, timeout=120)


def info(path: Path, *extra: str) -> dict:
    result = dsaserve("model", "info", path, "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    result = dsaserve("model", "init", out, "--preset", "tiny")
    assert result.returncode == 0, result.stderr
    assert "model.safetensors" in result.stdout and "tokenizer.json" in result.stdout
    return out


def test_init_tiny_writes_config_weights_and_v3_tokenizer(tiny_dir):
    assert {p.name for p in tiny_dir.iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    }
    tokenizer = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    assert tokenizer.token_to_id("<｜begin▁of▁sentence｜>") == 0
    assert tokenizer.token_to_id("<｜Assistant｜>") == 128804


def test_info_tiny(tiny_dir):
    report = info(tiny_dir)
    config = PRESETS["tiny"]
    assert report["config"]["vocab_size"] == 129280 and report["config"]["num_hidden_layers"] == 3
    params = report["params"]
    with torch.device("meta"):
        main = sum(t.numel() for t in DeepseekV32(config).state_dict().values())
        total = sum(t.numel() for t in DeepseekV32(config, with_mtp=True).state_dict().values())
    assert params["main"] == main and params["total"] == total and params["mtp"] == total - main
    assert params["embedding_and_head"] == 2 * 129280 * 128
    # 2 of 8 routed experts per MoE layer are active: 2 MoE layers × 6 idle experts × 3·64·128
    assert params["activated_per_token"] == main - 2 * 6 * 3 * 64 * 128
    kv = report["kv_bytes_per_token"]
    assert kv["latent"] == 3 * (64 + 16) * 2 and kv["indexer"] == 3 * 32 * 2
    assert kv["total"] == kv["latent"] + kv["indexer"]
    assert report["checkpoint"]["fp8"] is False


def test_init_fp8_sharded_from_config_file(tmp_path):
    config_file = tmp_path / "tiny512.json"
    config_file.write_text(json.dumps(SMALL_VOCAB.to_hf()))
    out = tmp_path / "ckpt"
    result = dsaserve("model", "init", out, "--preset", config_file, "--fp8", "--seed", 3, "--max-shard-mb", 1)
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) >= 2
    report = info(out, "--dtype", "float8")
    assert report["config"]["quantization_config"]["weight_block_size"] == [128, 128]
    assert report["checkpoint"]["fp8"] is True
    with torch.device("meta"):
        total = sum(t.numel() for t in DeepseekV32(SMALL_VOCAB, with_mtp=True).state_dict().values())
    assert report["params"]["total"] == total  # FP8 scales are not parameters
    # float8: c_kv 64 e4m3 bytes + one fp32 scale + k_pe 16 bf16 values; indexer 32 FP8 bytes + fp32 scale
    assert report["kv_bytes_per_token"] == {"dtype": "float8", "latent": 3 * 100, "indexer": 3 * 36, "total": 408}
    weights = report["resident_weight_bytes"]  # MTP excluded; FP8 resident ≈ 1 byte per weight + scales
    main = report["params"]["main"]
    assert (weights["float32"], weights["bfloat16"]) == (4 * main, 2 * main)
    assert main <= weights["checkpoint"] < 1.6 * main


def test_info_human_readable(tiny_dir):
    result = dsaserve("model", "info", tiny_dir)
    assert result.returncode == 0, result.stderr
    assert "activated_per_token" in result.stdout and "KV cache bytes per token (bfloat16)" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model", "init", "{tmp}/x", "--preset", "huge"], "unknown preset 'huge'"),
        (["model", "info", "{tmp}"], "config.json not found"),
        (["model", "info", "{tmp}", "--dtype", "fp4"], "invalid choice"),
        (["model", "init", "{tmp}/x", "--max-shard-mb", "0"], "must be positive"),
    ],
    ids=["bad-preset", "no-checkpoint", "bad-dtype", "bad-shard-size"],
)
def test_errors_exit_2_with_one_line(args, message, tmp_path):
    result = dsaserve(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_fp8_kv_bytes_of_the_671b_model():
    """MODEL.md: 656 bytes of latent and 132 bytes of indexer key per token and layer, 61 layers."""
    from cluster.cli import kv_bytes_per_token
    from workers.model.config import ModelConfig

    kv = kv_bytes_per_token(ModelConfig(), "float8")
    assert kv["latent"] == 61 * 656 and kv["indexer"] == 61 * 132
