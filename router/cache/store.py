"""Where cached answers live: in process (an LRU bounded in bytes) or in Redis (shared by
every replica).

Both hold opaque bytes under a hex key, with a TTL. The cache is an optimisation, so a
store that fails never fails a request: ``RedisStore`` raises ``StoreDown`` and the stage
counts it and goes on as on a miss. After a failure Redis is left alone for
``DOWN_FOR_S`` so that an outage costs one timeout, not one per request.
"""

from __future__ import annotations

import collections
import logging
from typing import Protocol

from redis.exceptions import RedisError

from kvroute.router.governance.clock import Clock
from kvroute.router.governance.config import RedisConfig
from kvroute.router.governance.redis_store import redis_client

DOWN_FOR_S = 5.0
_OVERHEAD = 64  # bytes an in-process entry costs beyond its key and value (a rough bound)
log = logging.getLogger(__name__)


class StoreDown(Exception):
    """A store call failed (or was skipped while the store is down)."""


class Store(Protocol):
    kind: str  # memory | redis

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def close(self) -> None: ...


class MemoryStore:
    """An LRU of at most ``max_bytes`` (keys, values and a per-entry overhead)."""

    kind = "memory"

    def __init__(self, max_bytes: int, clock: Clock | None = None):
        self.max_bytes = max_bytes
        self.clock = clock or Clock()
        self._entries: collections.OrderedDict[str, tuple[float, bytes]] = collections.OrderedDict()
        self.size = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        found = self._entries.get(key)
        if found is None:
            return None
        expires_at, value = found
        if expires_at <= self.clock.time():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        cost = len(key) + len(value) + _OVERHEAD
        if cost > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        while self.size + cost > self.max_bytes:
            self._drop(next(iter(self._entries)))  # least recently used first
        self._entries[key] = (self.clock.time() + ttl_s, value)
        self.size += cost

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self.size -= len(key) + len(value) + _OVERHEAD

    async def close(self) -> None:
        self._entries.clear()
        self.size = 0


class RedisStore:
    """``GET`` / ``SET PX`` under ``<prefix>:e:<key>``: every replica reads what any one wrote,
    and Redis expires entries on its own (set ``maxmemory-policy allkeys-lru`` to bound it)."""

    kind = "redis"

    def __init__(self, cfg: RedisConfig, clock: Clock | None = None):
        self.prefix = cfg.prefix
        self.clock = clock or Clock()
        self.client = redis_client(cfg)
        self._down_until = 0.0

    def _key(self, key: str) -> str:
        return f"{self.prefix}:e:{key}"

    async def get(self, key: str) -> bytes | None:
        self._check()
        try:
            value = await self.client.get(self._key(key))
            return value if isinstance(value, bytes) else None
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._failed("get", exc) from exc

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._check()
        try:
            await self.client.set(self._key(key), value, px=max(1, int(ttl_s * 1000)))
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._failed("set", exc) from exc

    def _check(self) -> None:
        if self.clock.time() < self._down_until:
            raise StoreDown("skipped: the cache's Redis failed moments ago")

    def _failed(self, op: str, exc: BaseException) -> StoreDown:
        if self.clock.time() >= self._down_until:
            log.warning("response cache: Redis %s failed (%s: %s); serving without the cache for %.0fs",
                        op, type(exc).__name__, exc, DOWN_FOR_S)
        self._down_until = self.clock.time() + DOWN_FOR_S
        return StoreDown(f"{op} failed")

    async def close(self) -> None:
        await self.client.aclose()


def make_store(redis: RedisConfig | None, max_bytes: int, clock: Clock | None = None) -> Store:
    return RedisStore(redis, clock) if redis is not None else MemoryStore(max_bytes, clock)
