"""Block hashing: the one function router, workers and the KV index share.

``H(parent, block token ids, extra)`` chained over full blocks only. The algorithm is fixed and
versioned (SHA-256 over a fixed byte encoding; no per-process seed), so every process, and Redis,
agrees bit for bit. The first block's ``extra`` carries the model id and the cache salt: different
models or tenants never share blocks.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

HASH_ALGORITHM = "sha256"
HASH_VERSION = 1
BLOCK_SIZE = 64  # tokens per KV block: the size DSA kernels use

BlockHash = bytes  # 32 bytes


def first_block_extra(model_id: str, cache_salt: str | None) -> bytes:
    model = model_id.encode()
    salt = b"" if cache_salt is None else cache_salt.encode()
    # Length-prefixed, and a salt flag: ("ab", None) and ("a", "b") never encode alike.
    return struct.pack("<I", len(model)) + model + struct.pack("<?I", cache_salt is not None, len(salt)) + salt


def hash_block(parent: BlockHash | None, tokens: Sequence[int], extra: bytes = b"") -> BlockHash:
    """Hash of one full block given its parent's hash (None for the first block)."""
    h = hashlib.sha256()
    h.update(b"dsaserve-kv\x00" + struct.pack("<HI", HASH_VERSION, len(tokens)))
    h.update(parent if parent is not None else b"\x00" * 32)
    h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    h.update(struct.pack("<I", len(extra)) + extra)
    return h.digest()


def block_hashes(
    token_ids: Sequence[int],
    *,
    model_id: str,
    cache_salt: str | None = None,
    block_size: int = BLOCK_SIZE,
) -> list[BlockHash]:
    """Chained hashes of the full blocks of ``token_ids`` (a trailing partial block has none)."""
    out: list[BlockHash] = []
    parent: BlockHash | None = None
    extra = first_block_extra(model_id, cache_salt)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], extra if start == 0 else b"")
        out.append(parent)
    return out


# Known answer: checked at start by every process that hashes (fail fast on a mismatch).
SELF_TEST_TOKENS = tuple(range(BLOCK_SIZE * 2))
SELF_TEST_DIGEST = "6811cbed"  # first 8 hex digits of the second block's hash for model "self-test"


def self_test() -> None:
    """Raise if this process's hashing disagrees with the pinned known answer."""
    got = block_hashes(SELF_TEST_TOKENS, model_id="self-test")[1].hex()[:8]
    if got != SELF_TEST_DIGEST:
        raise RuntimeError(
            f"block hash self-test failed: {got} != {SELF_TEST_DIGEST} ({HASH_ALGORITHM} v{HASH_VERSION}); "
            "router, workers and the KV index would never agree on cached blocks"
        )
