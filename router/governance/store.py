"""Governance state: budget counters with reservations, flags, recent-request lists, kill
entries and the spend ledger. ``MemoryStore`` serves one replica; ``RedisStore``
(``router.governance.redis_store``) shares the same state between replicas.

A budget instance (one session, one agent's day, ...) holds what was spent (``used``) and
what requests in flight have reserved. ``reserve`` is atomic over every budget a request
falls under: it checks all of them, grants as many completion tokens as the tightest one
leaves (at most what the request asked for), and reserves prompt + granted tokens in all
of them, or in none. Each reservation is a member ``rid|tokens|usd`` with an expiry, so a
reservation that is never settled (a crashed replica) frees itself after its TTL. ``settle``
removes the reservation and adds what was really used; settling a reservation that already
expired only adds the usage, so nothing is charged twice.

A windowed budget is rolling: its usage is kept in ``buckets`` sub-buckets of
``bucket_s = window_s / buckets`` seconds (absolute index ``floor(t / bucket_s)``), and what
counts is the sum of the current bucket and the ``buckets`` before it, so usage is remembered
for at least ``window_s`` and at most ``window_s + bucket_s``. Usage is settled into the
bucket of the reservation's time (kept in the member: ``rid@time|tokens|usd``). In-flight
reservations count in full until they are settled or expire.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kvroute.router.governance.ratelimit import RateResult, RateSlot

NONE = -1.0  # "no limit" in the wire form both stores share


@dataclass(frozen=True)
class Slot:
    """One budget instance a request falls under, with its limits."""

    key: str
    budget: str
    tokens: int | None = None
    usd: float | None = None
    tool_calls: int | None = None
    wall_s: float | None = None
    hard: bool = True
    expire_at: float = 0.0  # the state may be dropped after this (window end or session TTL)
    bucket_s: float = 0.0  # rolling windows: sub-bucket width (0: not rolling)
    buckets: int = 0  # rolling windows: sub-buckets per window

    @property
    def rolling(self) -> bool:
        return self.bucket_s > 0


@dataclass(frozen=True)
class Ask:
    rid: str
    slots: tuple[Slot, ...]
    prompt_tokens: int
    max_completion: int
    min_completion: int
    in_price: float  # dollars per prompt token
    out_price: float  # dollars per completion token
    now: float
    ttl_s: float


@dataclass
class Granted:
    ok: bool
    completion: int = 0  # completion tokens granted
    tokens: int = 0  # reserved: prompt + completion
    usd: float = 0.0
    member: str = ""
    failed: int | None = None  # index of the slot that refused (granted: that bounds the grant)
    reason: str | None = None  # tokens | usd | tool_calls | wall_s
    ratios: list[float] = field(default_factory=list)  # (used + reserved) / limit, before this ask
    reset_at: float | None = None  # refused by a rolling budget: when its oldest usage ages out
    deadline: float | None = None  # granted: when the tightest session wall-clock limit runs out
    unreserved: bool = False  # admitted with nothing reserved: the store was down (on_store_error: fail_open)


@dataclass
class Used:
    tokens: int = 0
    usd: float = 0.0
    tool_calls: int = 0


def ratio(slot: Slot, tokens: float, usd: float, tool_calls: float) -> float:
    r = 0.0
    if slot.tokens:
        r = max(r, tokens / slot.tokens)
    if slot.usd:
        r = max(r, usd / slot.usd)
    if slot.tool_calls:
        r = max(r, tool_calls / slot.tool_calls)
    return r


class Store(Protocol):
    async def reserve(self, ask: Ask) -> Granted: ...

    async def settle(self, member: str, keys: tuple[str, ...], reserved_tokens: int, reserved_usd: float,
                     tokens: int, usd: float, tool_calls: int, now: float = 0.0,
                     slots: tuple[Slot, ...] = ()) -> list[Used]: ...

    async def release(self, rid: str, keys: tuple[str, ...], expires_at: float) -> int: ...

    async def set_flag(self, key: str, ttl_s: float, now: float) -> bool: ...

    async def push_recent(self, key: str, value: str, n: int, ttl_s: float, now: float,
                          flag: str) -> tuple[list[str], bool]: ...

    async def kill_set(self, entry: str, value: str) -> None: ...

    async def kill_clear(self, entry: str) -> bool: ...

    async def kill_all(self) -> dict[str, str]: ...

    async def record_spend(self, hour: int, fields: dict[str, float], series: tuple[str, ...], usd: float,
                           ttl_s: float) -> None: ...

    async def spend(self, hours: range) -> dict[str, float]: ...

    async def hourly(self, series: str) -> dict[int, float]: ...

    async def rate_take(self, slots: list[RateSlot], rid: str, tokens: int, now: float) -> RateResult: ...

    async def add_fields(self, key: str, fields: dict[str, float], ttl_s: float, now: float) -> None:
        """Add to a hash of counters that expires ``ttl_s`` after its last write (trace rollups)."""

    async def read_fields(self, keys: list[str], now: float) -> list[dict[str, float]]: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


@dataclass
class _State:
    used_t: int = 0
    used_usd: float = 0.0
    used_tc: int = 0
    res_t: int = 0
    res_usd: float = 0.0
    start: float | None = None
    expire_at: float = 0.0
    reservations: dict[str, float] = field(default_factory=dict)  # member -> expiry
    buckets: dict[int, list] = field(default_factory=dict)  # rolling: bucket index -> [tokens, usd, tool calls]

    def roll(self, slot: Slot, now: float) -> None:
        """Rolling budgets: drop buckets that left the window and sum the rest into ``used_*``."""
        if not slot.rolling:
            return
        first = math.floor(now / slot.bucket_s) - slot.buckets
        for idx in [i for i in self.buckets if i < first]:
            del self.buckets[idx]
        live = self.buckets.values()
        self.used_t = sum(b[0] for b in live)
        self.used_usd = sum(b[1] for b in live)
        self.used_tc = sum(b[2] for b in live)

    def frees_at(self, slot: Slot, now: float) -> float:
        """Rolling budgets: when the oldest live usage ages out (the window's span when none)."""
        used = [i for i, b in self.buckets.items() if b[0] or b[1] or b[2]]
        idx = min(used) if used else math.floor(now / slot.bucket_s)
        return (idx + slot.buckets + 1) * slot.bucket_s

    def purge(self, now: float) -> None:
        for member, exp in list(self.reservations.items()):
            if exp <= now:
                _rid, t, usd = member.split("|")
                self.res_t -= int(t)
                self.res_usd -= float(usd)
                del self.reservations[member]


def plan(ask: Ask, states: list[_State]) -> Granted:
    """The reservation decision, shared in spirit with the Lua script of ``RedisStore``."""
    allowed: float = float(ask.max_completion)
    failed: int | None = None
    reason: str | None = None
    need = min(ask.min_completion, ask.max_completion)
    ratios: list[float] = []
    deadline = None

    def refuse(i: int | None, why: str | None) -> Granted:
        slot = ask.slots[i] if i is not None else None
        at = states[i].frees_at(slot, ask.now) if i is not None and slot is not None and slot.rolling else None
        return Granted(False, failed=i, reason=why, ratios=ratios, reset_at=at)

    for i, (slot, st) in enumerate(zip(ask.slots, states)):
        ratios.append(ratio(slot, st.used_t + st.res_t, st.used_usd + st.res_usd, st.used_tc))
        if not slot.hard:
            continue
        if slot.wall_s is not None:
            if st.start is not None and ask.now - st.start >= slot.wall_s:
                return refuse(i, "wall_s")
            end = (ask.now if st.start is None else st.start) + slot.wall_s
            deadline = end if deadline is None else min(deadline, end)
        if slot.tool_calls is not None and st.used_tc >= slot.tool_calls:
            return refuse(i, "tool_calls")
        if slot.tokens is not None:
            token_room = slot.tokens - st.used_t - st.res_t - ask.prompt_tokens
            if token_room < allowed:
                allowed, failed, reason = token_room, i, "tokens"
        if slot.usd is not None and (ask.in_price > 0 or ask.out_price > 0):  # a free model costs nothing
            left = slot.usd - st.used_usd - st.res_usd - ask.prompt_tokens * ask.in_price
            usd_room = (math.floor(left / ask.out_price + 1e-9) if ask.out_price > 0
                        else (math.inf if left >= 0 else -1))
            if usd_room < allowed:
                allowed, failed, reason = usd_room, i, "usd"
    if allowed < need:
        return refuse(failed, reason)
    completion = int(allowed)
    tokens = ask.prompt_tokens + completion
    usd = ask.prompt_tokens * ask.in_price + completion * ask.out_price
    return Granted(True, completion=completion, tokens=tokens, usd=usd,
                   member=f"{ask.rid}@{ask.now!r}|{tokens}|{usd!r}", failed=failed, reason=reason, ratios=ratios,
                   deadline=deadline)


def member_time(member: str) -> float | None:
    """When a reservation was made (``rid@time|tokens|usd``), or None for an older member."""
    head = member.split("|", 1)[0]
    if "@" not in head:
        return None
    try:
        return float(head.rsplit("@", 1)[1])
    except ValueError:
        return None


class MemoryStore:
    """All state in this process. Every method runs without awaiting, so each is atomic."""

    def __init__(self) -> None:
        self._states: dict[str, _State] = {}
        self._flags: dict[str, float] = {}
        self._recent: dict[str, tuple[deque, float]] = {}
        self._kills: dict[str, str] = {}
        self._spend: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._hourly: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        self._hashes: dict[str, tuple[defaultdict[str, float], float]] = {}  # add_fields: (counters, expiry)
        self._ops = 0
        from kvroute.router.governance.ratelimit import MemoryRates  # it imports this module

        self._rates = MemoryRates()

    def state(self, key: str) -> _State | None:
        """For tests and the admin view: a budget instance's counters."""
        return self._states.get(key)

    def _sweep(self, now: float) -> None:
        self._ops += 1
        if self._ops % 1024:
            return
        for key in [k for k, s in self._states.items() if s.expire_at < now and not s.reservations]:
            del self._states[key]
        for key in [k for k, exp in self._flags.items() if exp <= now]:
            del self._flags[key]
        for key in [k for k, (_, exp) in self._recent.items() if exp <= now]:
            del self._recent[key]

    async def reserve(self, ask: Ask) -> Granted:
        self._sweep(ask.now)
        states = []
        for slot in ask.slots:
            st = self._states.get(slot.key) or _State()
            st.purge(ask.now)
            st.roll(slot, ask.now)
            states.append(st)
        granted = plan(ask, states)
        if granted.ok:
            exp = ask.now + ask.ttl_s
            for slot, st in zip(ask.slots, states):
                st.res_t += granted.tokens
                st.res_usd += granted.usd
                st.reservations[granted.member] = exp
                st.start = ask.now if st.start is None else st.start
                st.expire_at = max(st.expire_at, slot.expire_at, exp)
                self._states[slot.key] = st
        return granted

    async def settle(self, member: str, keys: tuple[str, ...], reserved_tokens: int, reserved_usd: float,
                     tokens: int, usd: float, tool_calls: int, now: float = 0.0,
                     slots: tuple[Slot, ...] = ()) -> list[Used]:
        out = []
        at = member_time(member)
        for i, key in enumerate(keys):
            slot = slots[i] if i < len(slots) else None
            st = self._states.setdefault(key, _State())
            if st.reservations.pop(member, None) is not None:
                st.res_t -= reserved_tokens
                st.res_usd -= reserved_usd
            if slot is not None and slot.rolling:
                idx = math.floor((now if at is None else at) / slot.bucket_s)
                if idx >= math.floor(now / slot.bucket_s) - slot.buckets:  # else it already left the window
                    b = st.buckets.setdefault(idx, [0, 0.0, 0])
                    b[0] += tokens
                    b[1] += usd
                    b[2] += tool_calls
                    st.expire_at = max(st.expire_at, (idx + slot.buckets + 1) * slot.bucket_s)
                st.roll(slot, now)
            else:
                st.used_t += tokens
                st.used_usd += usd
                st.used_tc += tool_calls
            out.append(Used(st.used_t, st.used_usd, st.used_tc))
        return out

    async def release(self, rid: str, keys: tuple[str, ...], expires_at: float) -> int:
        """Drop request ``rid``'s reservation, if it holds one (see ``RedisStore.release``)."""
        n = 0
        for key in keys:
            st = self._states.get(key)
            if st is None:
                continue
            for member in [m for m in st.reservations if m.startswith(f"{rid}@")]:
                del st.reservations[member]
                _rid, t, usd = member.split("|")
                st.res_t -= int(t)
                st.res_usd -= float(usd)
                n += 1
        return n

    async def set_flag(self, key: str, ttl_s: float, now: float) -> bool:
        if self._flags.get(key, 0.0) > now:
            return False
        self._flags[key] = now + ttl_s
        return True

    async def push_recent(self, key: str, value: str, n: int, ttl_s: float, now: float,
                          flag: str) -> tuple[list[str], bool]:
        """Push ``value`` on a short list; return the list (newest first) and whether ``flag`` is set."""
        items, exp = self._recent.get(key, (None, 0.0))
        if items is None or exp <= now:
            items = deque(maxlen=n)
        items.appendleft(value)
        self._recent[key] = (items, now + ttl_s)
        return list(items), self._flags.get(flag, 0.0) > now

    async def kill_set(self, entry: str, value: str) -> None:
        self._kills[entry] = value

    async def kill_clear(self, entry: str) -> bool:
        return self._kills.pop(entry, None) is not None

    async def kill_all(self) -> dict[str, str]:
        return dict(self._kills)

    async def record_spend(self, hour: int, fields: dict[str, float], series: tuple[str, ...], usd: float,
                           ttl_s: float) -> None:
        """Add to the hour's ledger bucket and to each hourly spend ``series`` (spike detection)."""
        bucket = self._spend[hour]
        for f, v in fields.items():
            bucket[f] += v
        horizon = hour - int(ttl_s // 3600)
        for h in [h for h in self._spend if h < horizon]:
            del self._spend[h]
        for name in series:
            self._hourly[name][hour] += usd
            for h in [h for h in self._hourly[name] if h < horizon]:
                del self._hourly[name][h]

    async def spend(self, hours: range) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for h in hours:
            for f, v in self._spend.get(h, {}).items():
                out[f] += v
        return out

    async def hourly(self, series: str) -> dict[int, float]:
        return dict(self._hourly.get(series, {}))

    async def rate_take(self, slots: list[RateSlot], rid: str, tokens: int, now: float) -> RateResult:
        return self._rates.take(slots, rid, tokens, now)

    async def add_fields(self, key: str, fields: dict[str, float], ttl_s: float, now: float) -> None:
        counters, _ = self._hashes.get(key, (None, 0.0))
        if counters is None or self._hashes[key][1] <= now:
            counters = defaultdict(float)
        for f, v in fields.items():
            counters[f] += v
        self._hashes[key] = (counters, now + ttl_s)
        if len(self._hashes) % 1024 == 0:  # forget expired hashes now and then
            self._hashes = {k: e for k, e in self._hashes.items() if e[1] > now}

    async def read_fields(self, keys: list[str], now: float) -> list[dict[str, float]]:
        out = []
        for key in keys:
            counters, expires = self._hashes.get(key, ({}, 0.0))
            out.append(dict(counters) if expires > now else {})
        return out

    async def ping(self) -> None:
        pass

    async def close(self) -> None:
        pass
