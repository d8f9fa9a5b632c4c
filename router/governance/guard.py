"""Store faults: every call governance makes to its store goes through a ``GuardedStore``.

A call that fails (Redis refused the connection, did not answer within ``redis.timeout_s``,
or answered an error) raises ``StoreUnavailable`` naming the operation, is counted in
``kvroute_store_errors_total{op}``, and marks the store down. While it is down, calls fail
at once, without a round trip: a Redis that hangs costs the calls already waiting on it one
timeout each, and the requests after them nothing, instead of each holding a connection
and a request slot for the whole timeout. One probe (PING) at a time runs in the
background, at most every ``PROBE_EVERY_S``, and marks the store up when it answers; on an
idle replica the kill-switch poller's calls start it.

What a failure means for a request is decided by the callers
(``governance.on_store_error``): ``Governor`` for budgets and loops, ``KillSwitch`` for the
kill list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from kvroute.router.errors import StoreUnavailable
from kvroute.router.governance.clock import Clock
from kvroute.router.governance.ratelimit import RateResult, RateSlot
from kvroute.router.governance.store import Ask, Granted, Slot, Store, Used
from kvroute.router.metrics import RouterMetrics

try:
    from redis.exceptions import RedisError
except ImportError:  # redis is only needed with governance.redis
    RedisError = OSError  # type: ignore[assignment,misc]

STORE_ERRORS = (OSError, TimeoutError, RedisError)
# Once down, how often to ask again. Short, because every request in between takes the
# on_store_error path; long enough that a hung Redis sees one PING a second, not a storm.
PROBE_EVERY_S = 1.0

log = logging.getLogger(__name__)
T = TypeVar("T")


class GuardedStore:
    """A ``Store`` that fails fast while the store it wraps is down. The ``op`` labels are a
    small fixed set: reserve, settle, release, loops, flags, kill_refresh, kill_admin,
    ledger, spend_query, alerts, rate_limit, probe."""

    def __init__(self, store: Store, metrics: RouterMetrics, clock: Clock, probe_every_s: float = PROBE_EVERY_S):
        self.inner = store
        self.metrics = metrics
        self.clock = clock
        self.probe_every_s = probe_every_s
        self.up = True
        self.down_since: float | None = None
        self._probe_at = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._failed = 0  # calls failed in the current outage, for the recovery log line

    async def _call(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        if not self.up:
            self._count(op)
            self._maybe_probe()
            raise StoreUnavailable(op, sent=False)
        try:
            return await call()
        except STORE_ERRORS as exc:
            self._count(op)
            self._mark_down(op, exc)
            raise StoreUnavailable(op, sent=True) from exc

    def _count(self, op: str) -> None:
        self._failed += 1
        self.metrics.store_errors.labels(op).inc()

    def _mark_down(self, op: str, exc: BaseException) -> None:
        if not self.up:
            return  # calls in flight when it went down fail one after another: log the first
        self.up = False
        self.down_since = self._probe_at = self.clock.time()
        log.error("governance store unreachable (%s: %s: %s); failing fast until it answers a probe", op,
                  type(exc).__name__, exc)

    def _maybe_probe(self) -> None:
        if self._probe is None and self.clock.time() >= self._probe_at:
            self._probe = asyncio.get_running_loop().create_task(self._run_probe())

    async def _run_probe(self) -> None:
        try:
            await self.inner.ping()
        except Exception:  # still down, whatever it says: ask again later
            self._count("probe")
            self._probe_at = self.clock.time() + self.probe_every_s
        else:
            down_for = self.clock.time() - (self.down_since or 0.0)
            log.warning("governance store reachable again after %.1f s (%d calls failed meanwhile)", down_for,
                        self._failed)
            self.up, self.down_since, self._failed = True, None, 0
        finally:
            self._probe = None

    # ---- the Store protocol ------------------------------------------------------------

    async def reserve(self, ask: Ask) -> Granted:
        return await self._call("reserve", lambda: self.inner.reserve(ask))

    async def settle(self, member: str, keys: tuple[str, ...], reserved_tokens: int, reserved_usd: float,
                     tokens: int, usd: float, tool_calls: int, now: float = 0.0,
                     slots: tuple[Slot, ...] = ()) -> list[Used]:
        return await self._call("settle", lambda: self.inner.settle(
            member, keys, reserved_tokens, reserved_usd, tokens, usd, tool_calls, now, slots))

    async def release(self, rid: str, keys: tuple[str, ...], expires_at: float) -> int:
        return await self._call("release", lambda: self.inner.release(rid, keys, expires_at))

    async def set_flag(self, key: str, ttl_s: float, now: float) -> bool:
        return await self._call("flags", lambda: self.inner.set_flag(key, ttl_s, now))

    async def push_recent(self, key: str, value: str, n: int, ttl_s: float, now: float,
                          flag: str) -> tuple[list[str], bool]:
        return await self._call("loops", lambda: self.inner.push_recent(key, value, n, ttl_s, now, flag))

    async def kill_set(self, entry: str, value: str) -> None:
        await self._call("kill_admin", lambda: self.inner.kill_set(entry, value))

    async def kill_clear(self, entry: str) -> bool:
        return await self._call("kill_admin", lambda: self.inner.kill_clear(entry))

    async def kill_all(self) -> dict[str, str]:
        return await self._call("kill_refresh", self.inner.kill_all)

    async def record_spend(self, hour: int, fields: dict[str, float], series: tuple[str, ...], usd: float,
                           ttl_s: float) -> None:
        await self._call("ledger", lambda: self.inner.record_spend(hour, fields, series, usd, ttl_s))

    async def spend(self, hours: range) -> dict[str, float]:
        return await self._call("spend_query", lambda: self.inner.spend(hours))

    async def hourly(self, series: str) -> dict[int, float]:
        return await self._call("alerts", lambda: self.inner.hourly(series))

    async def rate_take(self, slots: list[RateSlot], rid: str, tokens: int, now: float) -> RateResult:
        return await self._call("rate_limit", lambda: self.inner.rate_take(slots, rid, tokens, now))

    async def add_fields(self, key: str, fields: dict[str, float], ttl_s: float, now: float) -> None:
        await self._call("ledger", lambda: self.inner.add_fields(key, fields, ttl_s, now))

    async def read_fields(self, keys: list[str], now: float) -> list[dict[str, float]]:
        return await self._call("spend_query", lambda: self.inner.read_fields(keys, now))

    async def ping(self) -> None:
        await self._call("probe", self.inner.ping)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.inner.close()
