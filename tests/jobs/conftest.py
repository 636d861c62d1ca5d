"""Fixtures for the batch job tests: a real redis-server, and a factory opening either ``JobStore``
(each test gets its own key prefix or file, and reopening gives a fresh connection to the same data)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.jobs.store import JobStore

from ..redis_server import RedisServer, running_redis


@pytest.fixture(scope="session")
def jobs_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("jobs-redis")) as server:
        yield server


class StoreFactory:
    """Opens stores of one kind on the same data; ``close`` closes them all."""

    def __init__(self, kind: str, tmp_path: Path, redis: RedisServer | None) -> None:
        self.kind = kind
        self.path = tmp_path / "jobs.sqlite3"
        self.redis = redis
        self.prefix = f"test-{uuid.uuid4().hex[:8]}"
        self.opened: list[JobStore] = []

    def open(self) -> JobStore:
        if self.kind == "sqlite":
            from router.jobs.sqlite_store import SQLiteJobStore

            store = SQLiteJobStore(self.path)
        else:
            from router.jobs.redis_store import RedisJobStore

            store = RedisJobStore.from_url(self.redis.url, prefix=self.prefix)
        self.opened.append(store)
        return store

    def close(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture(params=["sqlite", "redis"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    redis = request.getfixturevalue("jobs_redis") if request.param == "redis" else None
    factory = StoreFactory(request.param, tmp_path, redis)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="session")
def jobs_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny checkpoint with the V3 tokenizer, made with the CLI."""
    from cluster.cli import main

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert main(["model", "init", str(path), "--preset", "tiny"]) == 0
    return path
