"""Rate limits: requests and tokens per minute, per API key, tenant, agent or model.

Each limit instance (one key's minute, one agent's minute, ...) is a sliding-window log:
every admitted request leaves an entry ``(time, tokens)``, and a request is admitted when,
counting the entries of the last ``window_s`` seconds, one more request and its tokens fit
in every limit it falls under. The check and the append are one atomic step (a Lua script
over a sorted set and a running token sum in Redis; no await in memory), so the limits
hold exactly across replicas. A request's tokens are its prompt plus the completion
tokens it may generate (``max_tokens``, or ``governance.default_max_tokens``), counted
when it is admitted, as OpenAI counts them.

A refused request gets 429 ``rate_limit_exceeded`` with ``Retry-After`` (when enough of the
window has aged out for it to fit) and the ``x-ratelimit-*`` headers OpenAI clients read.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from kvroute.router.errors import RateLimited
from kvroute.router.governance.config import RateLimit
from kvroute.router.governance.identity import Attribution

NONE = -1


@dataclass(frozen=True)
class RateSlot:
    key: str  # the limit instance, e.g. "per-key:3f2a..."
    limit: RateLimit


@dataclass
class RateResult:
    ok: bool
    failed: int | None = None  # index of the slot that refused
    reason: str | None = None  # requests or tokens
    retry_at: float | None = None  # when the request would fit (None: it never fits alone)
    count: int = 0  # requests in the window of the refusing slot (before this one)
    tokens: int = 0  # tokens in that window
    requests_reset_at: float | None = None  # when that window's oldest request ages out


def slots_for(limits: tuple[RateLimit, ...], attrs: Attribution, model: str) -> list[RateSlot]:
    tags = {"tenant": attrs.tenant, "agent": attrs.agent, "task": attrs.task, "feature": attrs.feature,
            "user": attrs.user}
    out = []
    for lim in limits:
        if not lim.matches(tags):
            continue
        value = {"key": attrs.key_id, "tenant": attrs.tenant, "agent": attrs.agent, "model": model}[lim.per]
        if value is None:  # a per-agent limit counts only requests that name an agent
            continue
        who = f"{attrs.tenant}/{value}" if lim.per == "agent" else value
        out.append(RateSlot(f"{lim.name}:{who}", lim))
    return out


def _retry_tokens(entries, tokens_in: int, need: int, limit: int, window_s: float) -> float | None:
    """When enough of the oldest entries age out for ``need`` more tokens to fit."""
    if need > limit:
        return None
    freed = 0
    for t, n in entries:
        freed += n
        if tokens_in - freed + need <= limit:
            return t + window_s
    return None


class MemoryRates:
    """The sliding-window logs of one replica. ``take`` never awaits, so it is atomic."""

    def __init__(self) -> None:
        self._logs: dict[str, tuple[deque[tuple[float, int]], list[int]]] = {}
        self._ops = 0

    def take(self, slots: list[RateSlot], rid: str, tokens: int, now: float) -> RateResult:
        self._sweep(now)
        logs = []
        for i, s in enumerate(slots):
            entries, total = self._logs.setdefault(s.key, (deque(), [0]))
            cutoff = now - s.limit.window_s
            while entries and entries[0][0] <= cutoff:
                total[0] -= entries.popleft()[1]
            logs.append((entries, total))
            w, lim = s.limit.window_s, s.limit
            reset = entries[0][0] + w if entries else None
            if lim.requests is not None and len(entries) + 1 > lim.requests:
                free_at = entries[len(entries) - lim.requests][0] + w
                return RateResult(False, i, "requests", free_at, len(entries), total[0], reset)
            if lim.tokens is not None and total[0] + tokens > lim.tokens:
                fits_at = _retry_tokens(entries, total[0], tokens, lim.tokens, w)
                return RateResult(False, i, "tokens", fits_at, len(entries), total[0], reset)
        for entries, total in logs:
            entries.append((now, tokens))
            total[0] += tokens
        return RateResult(True)

    def _sweep(self, now: float) -> None:
        self._ops += 1
        if self._ops % 1024:
            return
        for key in [k for k, (e, _) in self._logs.items() if not e or e[-1][0] <= now - 3600]:
            del self._logs[key]


# KEYS: per slot a sorted set (members rid|tokens scored by time) and its running token sum.
# ARGV: now, rid, tokens, then per slot: window_s, requests limit, tokens limit (-1: none).
TAKE = """
local now, rid, t = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local n = #KEYS / 2
for i = 1, n do
  local z, s = KEYS[2 * i - 1], KEYS[2 * i]
  local w, R, T = tonumber(ARGV[1 + 3 * i]), tonumber(ARGV[2 + 3 * i]), tonumber(ARGV[3 + 3 * i])
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', now - w)
  if #old > 0 then
    local freed = 0
    for _, m in ipairs(old) do freed = freed + tonumber(string.match(m, '|(%d+)$')) end
    redis.call('DECRBY', s, freed)
    redis.call('ZREMRANGEBYSCORE', z, '-inf', now - w)
  end
  local count, tok = redis.call('ZCARD', z), tonumber(redis.call('GET', s) or '0')
  local reset = ''
  if count > 0 then
    reset = string.format('%.17g', tonumber(redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')[2]) + w)
  end
  if R >= 0 and count + 1 > R then
    local e = redis.call('ZRANGE', z, count - R, count - R, 'WITHSCORES')
    return {0, i - 1, 'requests', string.format('%.17g', tonumber(e[2]) + w), count, tok, reset}
  end
  if T >= 0 and tok + t > T then
    local at = ''
    if t <= T then
      local all, freed = redis.call('ZRANGE', z, 0, -1, 'WITHSCORES'), 0
      for j = 1, #all, 2 do
        freed = freed + tonumber(string.match(all[j], '|(%d+)$'))
        if tok - freed + t <= T then at = string.format('%.17g', tonumber(all[j + 1]) + w) break end
      end
    end
    return {0, i - 1, 'tokens', at, count, tok, reset}
  end
end
local member = rid .. '|' .. t
for i = 1, n do
  local z, s = KEYS[2 * i - 1], KEYS[2 * i]
  local ms = math.ceil(tonumber(ARGV[1 + 3 * i]) * 1000) + 1000
  redis.call('ZADD', z, now, member)
  redis.call('INCRBY', s, t)
  redis.call('PEXPIRE', z, ms)
  redis.call('PEXPIRE', s, ms)
end
return {1}
"""


def redis_args(slots: list[RateSlot], rid: str, tokens: int, now: float) -> list:
    args: list = [repr(now), rid, int(tokens)]
    for s in slots:
        lim = s.limit
        args += [repr(lim.window_s), NONE if lim.requests is None else lim.requests,
                 NONE if lim.tokens is None else lim.tokens]
    return args


def parse_reply(res: list) -> RateResult:
    if int(res[0]) == 1:
        return RateResult(True)
    return RateResult(False, int(res[1]), str(res[2]), float(res[3]) if res[3] else None, int(res[4]),
                      int(res[5]), float(res[6]) if res[6] else None)


def _duration(seconds: float) -> str:
    """OpenAI's reset format: 1s, 6m0s, 0.5s."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.3g}s" if seconds < 10 else f"{round(seconds)}s"
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s}s"


def refusal(slot: RateSlot, got: RateResult, tokens: int, now: float) -> RateLimited:
    lim = slot.limit
    per_min = 60.0 / lim.window_s
    if got.reason == "requests":
        what = f"{lim.requests} requests per {lim.window_s:g} s"
    else:
        what = f"{lim.tokens} tokens per {lim.window_s:g} s"
    msg = (f"Rate limit '{lim.name}' ({lim.per} scope: {what}) reached. ")
    if got.retry_at is None:
        msg += f"This request alone ({tokens} tokens: prompt + max_tokens) exceeds it; lower max_tokens."
    else:
        msg += f"Retry in {_duration(got.retry_at - now)}."
    headers: dict[str, str] = {}
    if got.retry_at is not None:
        headers["retry-after"] = str(max(1, math.ceil(got.retry_at - now)))
    if lim.requests is not None:
        headers["x-ratelimit-limit-requests"] = str(round(lim.requests * per_min))
        headers["x-ratelimit-remaining-requests"] = str(max(0, lim.requests - got.count))
        at = got.retry_at if got.reason == "requests" else got.requests_reset_at
        headers["x-ratelimit-reset-requests"] = _duration((at or now) - now)
    if lim.tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(round(lim.tokens * per_min))
        headers["x-ratelimit-remaining-tokens"] = str(max(0, lim.tokens - got.tokens))
        at = got.retry_at if got.reason == "tokens" else got.requests_reset_at
        headers["x-ratelimit-reset-tokens"] = _duration((at or now) - now)
    return RateLimited(msg, param=lim.name, kind=got.reason or "requests", headers=headers)
