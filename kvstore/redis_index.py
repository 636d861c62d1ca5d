"""RedisKVIndex: the cluster's ``KVIndex`` in Redis (redis-py asyncio, Lua for one-round-trip ops).

Layout, under one namespace (model id, block size, hash version; ``kvstore.index.namespace``):

- ``{ns}:worker:{id}`` — hash (role, ttl_ms) with a TTL: the worker's liveness. A heartbeat refreshes it.
- ``{ns}:blocks:{id}`` — hash: block hash (32 raw bytes) → tier bitmask (1 device, 2 host, 4 disk),
  expiring together with the worker key.
- ``{ns}:workers`` — set of worker ids ever registered; members whose worker key is gone are pruned by
  the lookup script.
- ``{ns}:events`` — stream of stored/removed events (``XADD MAXLEN ~``), one entry per changing call.

Why one hash per worker rather than one key per block holding a worker bitmap: a dead worker's
entries must stop counting within seconds and then vanish. With per-worker hashes, liveness and data
share one TTL, so expiry needs no sweep over millions of block keys; a lookup is one ``HMGET`` per live
worker and 64-block chunk, stopping at the first miss (a worker without the first block costs one
field read); store/remove touch one key. A per-block bitmap would need stable worker slot numbers
and a sweep of every block on each worker death, the failure Dynamo's users report on restart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from .hashing import BlockHash, block_hashes, self_test
from .index import (
    TIERS,
    Hasher,
    IndexEvent,
    IndexUnavailable,
    PrefixMatch,
    Tier,
    WorkerInfo,
    WorkerNotRegistered,
    WorkerRole,
    agreement_digest,
    agreement_key,
    agreement_record,
    check_agreement_record,
    namespace,
    tier_bit,
)

T = TypeVar("T")

# KEYS: worker, blocks, events. ARGV: tier bit, "stored"|"removed", worker id, tier, maxlen, hashes...
_CHANGE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('NOWORKER not registered') end
local b, mode, changed = tonumber(ARGV[1]), ARGV[2], {}
for i = 6, #ARGV do
  local old = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0')
  if mode == 'stored' and bit.band(old, b) == 0 then
    redis.call('HSET', KEYS[2], ARGV[i], bit.bor(old, b))
    changed[#changed + 1] = ARGV[i]
  elseif mode == 'removed' and bit.band(old, b) ~= 0 then
    local new = bit.band(old, bit.bnot(b))
    if new == 0 then redis.call('HDEL', KEYS[2], ARGV[i]) else redis.call('HSET', KEYS[2], ARGV[i], new) end
    changed[#changed + 1] = ARGV[i]
  end
end
if #changed > 0 then
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl > 0 and redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], pttl) end
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'kind', mode, 'worker', ARGV[3],
             'tier', ARGV[4], 'n', #changed, 'hashes', table.concat(changed))
end
return #changed
"""

# KEYS: worker, blocks. Refreshes both TTLs; 0 when the worker is gone.
_HEARTBEAT = """
local ttl = redis.call('HGET', KEYS[1], 'ttl_ms')
if not ttl then return 0 end
redis.call('PEXPIRE', KEYS[1], ttl)
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"""

# KEYS: workers set. ARGV: namespace, chunk, hashes... → {{id, role, ttl_ms, matched, dev, host, disk}...}
_LOOKUP = """
local ns, chunk, n = ARGV[1], tonumber(ARGV[2]), #ARGV - 2
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local info = redis.call('HMGET', ns .. ':worker:' .. id, 'role', 'ttl_ms')
  if not info[1] then
    redis.call('SREM', KEYS[1], id)
  else
    local row = {id, info[1], info[2], 0, 0, 0, 0}
    local bkey, start, full = ns .. ':blocks:' .. id, 1, true
    while full and start <= n do
      local stop = math.min(start + chunk - 1, n)
      local masks = redis.call('HMGET', bkey, unpack(ARGV, start + 2, stop + 2))
      for i = 1, #masks do
        local m = masks[i]
        if not m then full = false break end
        m = tonumber(m)
        row[4] = row[4] + 1
        if bit.band(m, 1) ~= 0 then row[5] = row[5] + 1
        elseif bit.band(m, 2) ~= 0 then row[6] = row[6] + 1
        else row[7] = row[7] + 1 end
      end
      start = stop + 1
    end
    out[#out + 1] = row
  end
end
return out
"""


class RedisKVIndex:
    """``KVIndex`` backed by Redis (see the module docstring for the key layout).

    ``url`` is a ``redis://`` or ``rediss://`` (TLS) URL; ``password``/``username`` and the ``ssl_*``
    options pass through to redis-py. Timeouts are short and retries off so that an outage surfaces as
    ``IndexUnavailable`` within about ``socket_timeout`` and the router falls back to load-only routing.
    """

    LOOKUP_CHUNK = 64  # blocks per HMGET: a miss in the first chunk ends a worker's scan
    MAX_LOOKUP_BLOCKS = 4096  # Lua's unpack limit is ~8000 values; 4096 blocks = 256K tokens at 64

    def __init__(
        self,
        url: str,
        model_id: str,
        block_size: int = 64,
        *,
        password: str | None = None,
        username: str | None = None,
        ssl_ca_certs: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        ssl_cert_reqs: str | None = None,
        socket_timeout: float = 2.0,
        socket_connect_timeout: float = 1.0,
        events_maxlen: int = 100_000,
        hasher: Hasher = block_hashes,
    ) -> None:
        self.model_id = model_id
        self.block_size = block_size
        self.namespace = namespace(model_id, block_size)
        self._hasher = hasher
        self._events_maxlen = events_maxlen
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_connect_timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        optional = {
            "password": password, "username": username, "ssl_ca_certs": ssl_ca_certs,
            "ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile, "ssl_cert_reqs": ssl_cert_reqs,
        }
        options.update({k: v for k, v in optional.items() if v is not None})
        self._redis = aioredis.Redis.from_url(url, **options)
        self._change = self._redis.register_script(_CHANGE)
        self._heartbeat = self._redis.register_script(_HEARTBEAT)
        self._lookup = self._redis.register_script(_LOOKUP)

    def _key(self, kind: str, worker_id: str | None = None) -> str:
        return f"{self.namespace}:{kind}" if worker_id is None else f"{self.namespace}:{kind}:{worker_id}"

    async def _call(self, op: Awaitable[T]) -> T:
        """Await a Redis operation, mapping backend errors onto the protocol's errors.

        Every Redis error but our own NOWORKER reply is ``IndexUnavailable``: besides an unreachable
        server, a server demoted to a replica (READONLY, MASTERDOWN), a full one (OOM), a user without the
        rights (NOPERM) or a script error all mean the same to callers — the index cannot answer now.
        """
        try:
            return await op
        except ResponseError as e:
            if "NOWORKER" in str(e):
                raise WorkerNotRegistered("worker not registered (expired, or the index restarted)") from None
            raise IndexUnavailable(f"KV index at Redis failed: {type(e).__name__}: {e}") from e
        except (RedisError, OSError) as e:
            raise IndexUnavailable(f"KV index at Redis unavailable: {type(e).__name__}: {e}") from e

    async def register_worker(self, worker_id: str, role: WorkerRole, ttl_s: float = 10.0) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        ttl_ms = max(1, int(ttl_s * 1000))
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._key("worker", worker_id), mapping={"role": role, "ttl_ms": ttl_ms})
        pipe.pexpire(self._key("worker", worker_id), ttl_ms)
        pipe.pexpire(self._key("blocks", worker_id), ttl_ms)
        pipe.sadd(self._key("workers"), worker_id)
        await self._call(pipe.execute())

    async def heartbeat(self, worker_id: str) -> bool:
        keys = [self._key("worker", worker_id), self._key("blocks", worker_id)]
        return bool(await self._call(self._heartbeat(keys=keys)))

    async def _apply(self, kind: str, worker_id: str, tier: Tier, hashes: Sequence[BlockHash]) -> None:
        keys = [self._key("worker", worker_id), self._key("blocks", worker_id), self._key("events")]
        args = [tier_bit(tier), kind, worker_id, tier, self._events_maxlen, *hashes]
        await self._call(self._change(keys=keys, args=args))

    async def store(self, worker_id: str, tier: Tier, hashes: Sequence[BlockHash]) -> None:
        await self._apply("stored", worker_id, tier, hashes)

    async def remove(self, worker_id: str, tier: Tier, hashes: Sequence[BlockHash]) -> None:
        await self._apply("removed", worker_id, tier, hashes)

    async def clear_worker(self, worker_id: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self._key("worker", worker_id), self._key("blocks", worker_id))
        pipe.srem(self._key("workers"), worker_id)
        await self._call(pipe.execute())

    async def _scan(self, hashes: Sequence[BlockHash]) -> list[list[Any]]:
        args = [self.namespace, self.LOOKUP_CHUNK, *hashes[: self.MAX_LOOKUP_BLOCKS]]
        return await self._call(self._lookup(keys=[self._key("workers")], args=args))

    async def longest_prefix(self, hashes: Sequence[BlockHash]) -> dict[str, PrefixMatch]:
        out = {}
        for wid, _, _, *counts in await self._scan(hashes):
            worker_id = wid.decode()
            out[worker_id] = PrefixMatch(worker_id, *(int(c) for c in counts))
        return out

    async def workers(self) -> list[WorkerInfo]:
        return [
            WorkerInfo(wid.decode(), role.decode(), int(ttl_ms) / 1000)  # type: ignore[arg-type]
            for wid, role, ttl_ms, *_ in await self._scan([])
        ]

    async def recent_events(self, count: int = 100) -> list[IndexEvent]:
        entries = await self._call(self._redis.xrevrange(self._key("events"), count=count))
        out = []
        for _, fields in reversed(entries):
            blob = fields[b"hashes"]
            size = len(blob) // max(1, int(fields[b"n"]))
            hashes = tuple(blob[i : i + size] for i in range(0, len(blob), size))
            kind, worker, tier = (fields[k].decode() for k in (b"kind", b"worker", b"tier"))
            assert tier in TIERS, tier
            out.append(IndexEvent(kind, worker, tier, hashes))  # type: ignore[arg-type]
        return out

    async def check_hash_agreement(self) -> None:
        self_test()
        mine = agreement_digest(self.model_id, self.block_size, self._hasher)
        key = agreement_key(self.model_id, self.block_size)
        await self._call(self._redis.set(key, agreement_record(mine), nx=True))
        stored = await self._call(self._redis.get(key))
        if stored is None:  # deleted between the two calls: try once more
            await self._call(self._redis.set(key, agreement_record(mine), nx=True))
            stored = await self._call(self._redis.get(key)) or agreement_record(mine).encode()
        check_agreement_record(stored.decode(), mine, self.model_id, self.block_size)

    async def close(self) -> None:
        await self._redis.aclose()
