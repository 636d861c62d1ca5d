"""Fixtures for the router tests: one tiny checkpoint (real V3 tokenizer) per session, a copy without
tokenizer files, real LocalBackends and real gRPC servers on free 127.0.0.1 ports."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.server import server_port, start_server
from router.tokenizer import Tokenizer

MAX_MODEL_LEN = 256  # small, so that context-limit errors need only short prompts


class ServerThread:
    """A gRPC server on its own event loop in a daemon thread (tests call it with sync clients)."""

    def __init__(self, backend, tokenizer, **kwargs) -> None:
        self.backend = backend
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.run(start_server(backend, tokenizer, "127.0.0.1", 0, **kwargs))
        self.address = f"127.0.0.1:{server_port(self.server)}"

    def run(self, coro, timeout: float = 30.0):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny checkpoint with the V3 tokenizer, made with the CLI."""
    from cluster.cli import main

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert main(["model", "init", str(path), "--preset", "tiny"]) == 0
    return path


@pytest.fixture(scope="session")
def no_tokenizer_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights without tokenizer files: a server that takes token ids only."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-notok"
    path.mkdir()
    for f in tiny_dir.iterdir():
        if not f.name.startswith("tokenizer"):
            os.symlink(f, path / f.name)
    return path


@pytest.fixture(scope="session")
def tokenizer(tiny_dir: Path) -> Tokenizer:
    tok = Tokenizer.load(tiny_dir)
    assert tok is not None
    return tok


@pytest.fixture(scope="session")
def server(tiny_dir: Path, tokenizer: Tokenizer) -> Iterator[ServerThread]:
    """A server on a LocalBackend (prefill + decode engines) over the tiny checkpoint."""
    from cluster.local import LocalBackend
    from workers.engine.config import EngineConfig

    with LocalBackend.start(
        tiny_dir, engine_config=EngineConfig(max_model_len=MAX_MODEL_LEN, num_blocks=512)
    ) as backend:
        st = ServerThread(backend, tokenizer)
        yield st
        st.stop()


@pytest.fixture(scope="session")
def small_queue_server(no_tokenizer_dir: Path) -> Iterator[ServerThread]:
    """Token ids only (no tokenizer files) and an admission queue of one request."""
    from cluster.local import LocalBackend
    from workers.engine.config import EngineConfig

    config = EngineConfig(max_model_len=MAX_MODEL_LEN, num_blocks=64, max_queue=1)
    with LocalBackend.start(no_tokenizer_dir, engine_config=config, disaggregate=False) as backend:
        assert Tokenizer.load(no_tokenizer_dir) is None
        st = ServerThread(backend, None)
        yield st
        st.stop()
