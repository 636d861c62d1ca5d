"""A real ``dsaserve local`` process for the job tests, on fixed free ports so that a restart keeps its
addresses, with its jobs in a SQLite file the test names."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai

from ..redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]


class LocalServer:
    def __init__(self, model: Path, store: Path, *extra: str) -> None:
        self.model, self.store, self.extra = model, store, extra
        self.grpc_port, self.http_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.http_port}/v1", api_key="none", max_retries=0,
                             timeout=60)

    def start(self) -> LocalServer:
        args = [sys.executable, "-m", "cluster.cli_serve", "local", "--model", str(self.model), "--dtype", "float32",
                "--port", str(self.grpc_port), "--http-port", str(self.http_port), "--jobs-store", str(self.store),
                *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline()
        if "ready on" not in line:
            self.proc.kill()
            raise RuntimeError(f"the server did not start: {line}{self.proc.stderr.read()}")
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def upload(api: openai.OpenAI, lines: list[str | dict]) -> str:
    data = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    return api.files.create(file=("input.jsonl", io.BytesIO(data.encode())), purpose="batch").id


def completion_line(i: int, *, max_tokens: int = 4, **body) -> dict:
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
            "body": {"model": "tiny", "prompt": [7 + i % 50, 11 + i % 13, 3 + i % 7], "max_tokens": max_tokens,
                     "temperature": 0, **body}}


def wait_for(api: openai.OpenAI, batch_id: str, cond, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while True:
        b = api.batches.retrieve(batch_id)
        if cond(b):
            return b
        assert time.monotonic() < deadline, f"batch {batch_id} stuck: {b}"
        time.sleep(0.1)


def ended(b) -> bool:
    return b.status in ("completed", "failed", "cancelled", "expired")


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
