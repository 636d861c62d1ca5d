"""Request limits the router enforces before any work is done, reported by ``ListModels``.

Every field a client controls has a bound, so no accepted request can cost the router more than a
known amount: stop strings are searched on every generated token (count × length per token), ids and
salts are hashed and stored per block, text is tokenized before its token count is known. A request
over a limit gets INVALID_ARGUMENT naming the field and the limit; a server over its stream or queue
limit answers RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

GRPC_DEFAULT_MESSAGE_BYTES = 4 * 2**20


@dataclass(frozen=True)
class RequestLimits:
    """Per-request bounds (sizes in characters of the decoded string) and per-server gRPC bounds.

    ``max_prompt_chars`` 0 means derived from the context: ``max(2**20, 16 × max_context)`` (a
    token is rarely longer than 16 characters, so a longer text cannot fit the context anyway).
    ``max_concurrent_streams`` 0 means ``max_queue + 64`` (room for health and status calls while
    the queue is full).
    """

    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 256
    max_request_id_chars: int = 256
    max_cache_salt_chars: int = 256
    max_prompt_chars: int = 0
    max_message_bytes: int = GRPC_DEFAULT_MESSAGE_BYTES
    max_concurrent_streams: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{f.name} must be an integer ≥ 0, got {value!r}")
        for name in ("max_stop_string_chars", "max_request_id_chars", "max_cache_salt_chars", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")

    def resolved(self, *, max_context: int, max_queue: int) -> RequestLimits:
        """The limits with the derived (0) fields filled in for a model and queue."""
        return replace(
            self,
            max_prompt_chars=self.max_prompt_chars or max(2**20, 16 * max_context),
            max_concurrent_streams=self.max_concurrent_streams or max_queue + 64,
        )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_pairs(cls, pairs: list[str]) -> RequestLimits:
        """From ``NAME=VALUE`` strings (the CLI's repeated ``--limit``).

        Raises:
            ValueError: naming the unknown limit or the bad value.
        """
        values: dict[str, Any] = {}
        for pair in pairs:
            name, sep, raw = pair.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in cls.names():
                raise ValueError(f"--limit {pair!r}: expected NAME=INTEGER with NAME one of {', '.join(cls.names())}")
            try:
                values[name] = int(raw)
            except ValueError:
                raise ValueError(f"--limit {pair!r}: {raw!r} is not an integer") from None
        return cls(**values)

    def to_json(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
