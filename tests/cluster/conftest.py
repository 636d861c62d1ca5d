"""A real cluster (`dsaserve serve` → Ray Serve, Serve's gRPC proxy) on a small checkpoint."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from workers.model.presets import load_preset
from workers.model.writer import random_state_dict, write_checkpoint

from ..redis_server import free_port

VOCAB = 1024


@pytest.fixture(scope="session")
def cluster_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cluster-model")
    cfg = dataclasses.replace(load_preset("tiny"), vocab_size=VOCAB)
    write_checkpoint(path, cfg, random_state_dict(cfg, seed=5))
    return path


class RunningCluster:
    """``dsaserve serve --config`` in a subprocess; ``stop()`` sends SIGTERM and waits."""

    def __init__(self, proc: subprocess.Popen, address: str, log: Path, config: dict) -> None:
        self.proc, self.address, self.log, self.config = proc, address, log, config

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_cluster(tmp: Path, model: Path, transfer: str, *, decode_replicas: int = 2, prefill_replicas: int = 1,
                  **extra) -> RunningCluster:
    """``launch_cluster`` and wait for its ready line."""
    running = launch_cluster(tmp, model, transfer, decode_replicas=decode_replicas,
                             prefill_replicas=prefill_replicas, **extra)
    return wait_cluster_ready(running)


def launch_cluster(tmp: Path, model: Path, transfer: str, *, decode_replicas: int = 2, prefill_replicas: int = 1,
                   **extra) -> RunningCluster:
    """Start ``dsaserve serve`` on a config of these settings (``extra`` sections merge) and return at once."""
    grpc_port = free_port()
    config = {
        "model": str(model),
        "prefill": {"replicas": prefill_replicas, "num_blocks": 64, "num_cpus": 0.1},
        "decode": {"replicas": decode_replicas, "num_blocks": 64, "num_cpus": 0.1},
        "transfer": transfer,
        "router": {"grpc_port": grpc_port, "http_port": free_port()},
        "lease_s": 20,
        "transfer_timeout_s": 5,
        "routing": {"local_prefill_max_tokens": 0},  # always disaggregate: these tests measure transfers
        "dtype": "float32",  # the tests compare tokens with load_model's float32 reference
    }
    for key, value in extra.items():  # nested sections merge, others replace
        config[key] = {**config[key], **value} if isinstance(config.get(key), dict) else value
    cfg_path = tmp / f"cluster-{transfer}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    log = tmp / f"serve-{transfer}.log"
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--config", str(cfg_path)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[2])
    return RunningCluster(proc, f"127.0.0.1:{grpc_port}", log, config)


def wait_cluster_ready(running: RunningCluster, timeout_s: float = 240.0) -> RunningCluster:
    """Wait for the ready line of ``dsaserve serve`` (it prints it once a Generate would succeed)."""
    proc, log = running.proc, running.log
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dsaserve serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if "cluster ready" in log.read_text():
            return running
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"cluster not ready in time:\n{log.read_text()[-3000:]}")
