"""Governance state in Redis, shared by every router replica.

Reservations are atomic Lua scripts (one round trip each for reserve and settle) over two
keys per budget instance: a hash of counters and a sorted set of reservations scored by
their expiry. A rolling (windowed) budget keeps its usage in the same hash, one field per
sub-bucket and counter (``t:<index>``, ``u:<index>``, ``c:<index>``); the scripts drop the
fields that left the window and sum the rest. The scripts follow ``store.plan`` and
``MemoryStore.settle`` exactly. All
keys start with the configured prefix and carry a TTL, so Redis never fills with dead
windows or sessions. Multi-key scripts need one Redis (or Sentinel), not Redis Cluster.

The client waits at most ``connect_timeout_s`` to connect and ``timeout_s`` for each reply,
and never retries: a reserve or settle is not idempotent (a retry after a reply was lost
would count twice), and a Redis that is down should cost one timeout, not several. A call
that timed out may still run once Redis answers again (a paused Redis reads what was
already sent): ``release`` takes back a reservation made that way.
"""

from __future__ import annotations

import math
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from kvroute.router.governance import ratelimit
from kvroute.router.governance.config import RedisConfig
from kvroute.router.governance.ratelimit import RateResult, RateSlot
from kvroute.router.governance.store import NONE, Ask, Granted, Slot, Used

_PARSE = "local _, _, rt, ru = string.find(m, '^[^|]*|([^|]*)|(.*)$')"

# Rolling budgets: sum the live sub-buckets of hash h into ut, uu, utc (dropping the dead ones),
# and find the oldest non-empty one. Needs now, bs (bucket width) and nb (buckets per window).
_ROLL = """
local function roll(h, now, bs, nb)
  local first = math.floor(now / bs) - nb
  local all = redis.call('HGETALL', h)
  local ut, uu, utc, oldest, dead = 0, 0, 0, nil, {}
  for j = 1, #all, 2 do
    local kind, idx = string.match(all[j], '^([tuc]):(%-?%d+)$')
    if kind then
      idx = tonumber(idx)
      if idx < first then
        dead[#dead + 1] = all[j]
      else
        local v = tonumber(all[j + 1])
        if kind == 't' then ut = ut + v elseif kind == 'u' then uu = uu + v else utc = utc + v end
        if v ~= 0 and (not oldest or idx < oldest) then oldest = idx end
      end
    end
  end
  if #dead > 0 then redis.call('HDEL', h, unpack(dead)) end
  return ut, uu, utc, oldest
end
"""

RESERVE = """
local now, ttl, prompt = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local maxc, minc, pin, pout = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local rid = ARGV[8]
local n = #KEYS / 2
local allowed, need, failed, reason = maxc, math.min(minc, maxc), -1, ''
local ratios, starts, frees, deadline = {}, {}, {}, nil
ROLL
local function refuse(i, why)
  local at = ''
  if i >= 0 and frees[i + 1] then at = string.format('%.17g', frees[i + 1]) end
  return {0, i, why, at, unpack(ratios)}
end
local function ratio(lt, lu, ltc, t, u, tc)
  local r = 0
  if lt > 0 then r = math.max(r, t / lt) end
  if lu > 0 then r = math.max(r, u / lu) end
  if ltc > 0 then r = math.max(r, tc / ltc) end
  return r
end
for i = 1, n do
  local h, z, b = KEYS[2 * i - 1], KEYS[2 * i], 8 + (i - 1) * 8
  local lt, lu, ltc = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local wall, hard = tonumber(ARGV[b + 4]), ARGV[b + 5] == '1'
  local bs, nb = tonumber(ARGV[b + 7]), tonumber(ARGV[b + 8])
  local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  if #expired > 0 then
    local dt, du = 0, 0
    for _, m in ipairs(expired) do
      PARSE
      dt, du = dt + tonumber(rt), du + tonumber(ru)
    end
    redis.call('HINCRBY', h, 'res_t', -dt)
    redis.call('HINCRBYFLOAT', h, 'res_usd', -du)
    redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
  end
  local v = redis.call('HMGET', h, 'used_t', 'used_usd', 'used_tc', 'res_t', 'res_usd', 'start')
  local ut, uu, utc = tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0
  local rt, ru, start = tonumber(v[4]) or 0, tonumber(v[5]) or 0, tonumber(v[6])
  if bs > 0 then
    local oldest
    ut, uu, utc, oldest = roll(h, now, bs, nb)
    frees[i] = ((oldest or math.floor(now / bs)) + nb + 1) * bs
  end
  starts[i] = start
  ratios[i] = tostring(ratio(lt, lu, ltc, ut + rt, uu + ru, utc))
  if hard then
    if wall >= 0 then
      if start and now - start >= wall then return refuse(i - 1, 'wall_s') end
      local stop = (start or now) + wall
      if not deadline or stop < deadline then deadline = stop end
    end
    if ltc >= 0 and utc >= ltc then
      return refuse(i - 1, 'tool_calls')
    end
    if lt >= 0 then
      local room = lt - ut - rt - prompt
      if room < allowed then allowed, failed, reason = room, i - 1, 'tokens' end
    end
    if lu >= 0 and (pin > 0 or pout > 0) then
      local left = lu - uu - ru - prompt * pin
      local room
      if pout > 0 then room = math.floor(left / pout + 1e-9)
      elseif left >= 0 then room = allowed else room = -1 end
      if room < allowed then allowed, failed, reason = room, i - 1, 'usd' end
    end
  end
end
if allowed < need then
  return refuse(failed, reason)
end
local tokens = prompt + allowed
local usd = prompt * pin + allowed * pout
local member = rid .. '@' .. ARGV[1] .. '|' .. tokens .. '|' .. string.format('%.17g', usd)
for i = 1, n do
  local h, z, b = KEYS[2 * i - 1], KEYS[2 * i], 8 + (i - 1) * 8
  redis.call('HINCRBY', h, 'res_t', tokens)
  redis.call('HINCRBYFLOAT', h, 'res_usd', usd)
  if not starts[i] then redis.call('HSET', h, 'start', ARGV[1]) end
  redis.call('ZADD', z, now + ttl, member)
  local exp = math.ceil(math.max(tonumber(ARGV[b + 6]), now + ttl))
  redis.call('EXPIREAT', h, exp)
  redis.call('EXPIREAT', z, exp)
end
local dl = ''
if deadline then dl = string.format('%.17g', deadline) end
return {1, allowed, tokens, string.format('%.17g', usd), member, failed, reason, dl, unpack(ratios)}
""".replace("PARSE", _PARSE).replace("ROLL", _ROLL)

SETTLE = """
local m, t, u, tc, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now = tonumber(ARGV[6])
PARSE
ROLL
local at = tonumber(string.match(m, '^[^@|]*@([^|]*)|')) or now
local out = {}
for i = 1, #KEYS / 2 do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  local bs, nb = tonumber(ARGV[5 + 2 * i]), tonumber(ARGV[6 + 2 * i])
  if redis.call('ZREM', z, m) == 1 then
    redis.call('HINCRBY', h, 'res_t', -tonumber(rt))
    redis.call('HINCRBYFLOAT', h, 'res_usd', -tonumber(ru))
  end
  if bs > 0 then
    local idx = math.floor(at / bs)
    if idx >= math.floor(now / bs) - nb then
      local f = string.format('%d', idx)
      redis.call('HINCRBY', h, 't:' .. f, t)
      redis.call('HINCRBYFLOAT', h, 'u:' .. f, u)
      redis.call('HINCRBY', h, 'c:' .. f, tc)
      local exp = math.ceil((idx + nb + 1) * bs)
      local left = redis.call('TTL', h)
      if left < 0 or now + left < exp then redis.call('EXPIREAT', h, exp) end
    end
    local ut, uu, utc = roll(h, now, bs, nb)
    out[#out + 1] = ut
    out[#out + 1] = string.format('%.17g', uu)
    out[#out + 1] = utc
  else
    out[#out + 1] = redis.call('HINCRBY', h, 'used_t', t)
    out[#out + 1] = redis.call('HINCRBYFLOAT', h, 'used_usd', u)
    out[#out + 1] = redis.call('HINCRBY', h, 'used_tc', tc)
    if redis.call('TTL', h) < 0 then redis.call('EXPIRE', h, ttl) end
  end
end
return out
""".replace("PARSE", _PARSE).replace("ROLL", _ROLL)


# Take back the reservation request ARGV[1] made with expiry ARGV[2] (its zset score), if it
# holds one: a reserve whose reply timed out may have run after all.
RELEASE = """
local head, at = ARGV[1] .. '@', tonumber(ARGV[2])
local n = 0
for i = 1, #KEYS / 2 do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', z, at - 1, at + 1)) do
    if string.sub(m, 1, #head) == head then
      PARSE
      redis.call('ZREM', z, m)
      redis.call('HINCRBY', h, 'res_t', -tonumber(rt))
      redis.call('HINCRBYFLOAT', h, 'res_usd', -tonumber(ru))
      n = n + 1
    end
  end
end
return n
""".replace("PARSE", _PARSE)


def _n(value: float | None) -> str:
    return repr(NONE if value is None else value)



def redis_client(cfg: RedisConfig, *, decode_responses: bool = False) -> aioredis.Redis:
    """A client that fails fast: ``cfg``'s short timeouts and no retries of its own (the
    callers decide what a failure means: refuse, skip, or carry on alone)."""
    return aioredis.Redis.from_url(cfg.url, password=cfg.password, socket_timeout=cfg.timeout_s,
                                   socket_connect_timeout=cfg.connect_timeout_s, retry=Retry(NoBackoff(), 0),
                                   decode_responses=decode_responses)

class RedisStore:
    def __init__(self, client: aioredis.Redis, prefix: str = "kvroute:gov", settle_ttl_s: float = 86400.0):
        # decode_responses=True: every reply is str, which redis-py's stubs cannot express.
        self.r: Any = client
        self.p = prefix
        self._settle_ttl = int(settle_ttl_s)
        self._reserve = client.register_script(RESERVE)
        self._settle = client.register_script(SETTLE)
        self._release = client.register_script(RELEASE)
        self._rate = client.register_script(ratelimit.TAKE)

    @classmethod
    def from_url(cls, url: str, prefix: str = "kvroute:gov", password: str | None = None, *,
                 connect_timeout_s: float = 0.5, timeout_s: float = 0.5) -> RedisStore:
        cfg = RedisConfig(url, prefix, password, connect_timeout_s, timeout_s)
        return cls(redis_client(cfg, decode_responses=True), prefix)

    def _keys(self, keys) -> list[str]:
        out = []
        for k in keys:
            out += [f"{self.p}:b:{k}", f"{self.p}:z:{k}"]
        return out

    async def budget(self, key: str) -> dict[str, str]:
        """For tests and the admin view: a budget instance's counters. For a rolling budget,
        ``used_*`` sum the sub-buckets the last reserve or settle kept (``t:``/``u:``/``c:<index>``)."""
        raw = await self.r.hgetall(f"{self.p}:b:{key}")
        sums = {"t": 0.0, "u": 0.0, "c": 0.0}
        for f, v in raw.items():
            if f[:2] in ("t:", "u:", "c:"):
                sums[f[0]] += float(v)
        if any(f[:2] in ("t:", "u:", "c:") for f in raw):
            raw.update(used_t=str(int(sums["t"])), used_usd=repr(sums["u"]), used_tc=str(int(sums["c"])))
        return raw

    async def reservations(self, key: str) -> int:
        return await self.r.zcard(f"{self.p}:z:{key}")

    async def reserve(self, ask: Ask) -> Granted:
        args: list = [repr(ask.now), repr(ask.ttl_s), ask.prompt_tokens, ask.max_completion, ask.min_completion,
                      repr(ask.in_price), repr(ask.out_price), ask.rid]
        for s in ask.slots:
            args += [_n(s.tokens), _n(s.usd), _n(s.tool_calls), _n(s.wall_s), "1" if s.hard else "0",
                     repr(s.expire_at), repr(float(s.bucket_s)), s.buckets]
        res = await self._reserve(keys=self._keys(s.key for s in ask.slots), args=args)
        if int(res[0]) == 1:
            bound = int(res[5])
            return Granted(True, completion=int(res[1]), tokens=int(res[2]), usd=float(res[3]), member=res[4],
                           failed=bound if bound >= 0 else None, reason=res[6] or None,
                           deadline=float(res[7]) if res[7] else None, ratios=[float(x) for x in res[8:]])
        failed = int(res[1])
        return Granted(False, failed=failed if failed >= 0 else None, reason=res[2] or None,
                       reset_at=float(res[3]) if res[3] else None, ratios=[float(x) for x in res[4:]])

    async def settle(self, member: str, keys: tuple[str, ...], reserved_tokens: int, reserved_usd: float,
                     tokens: int, usd: float, tool_calls: int, now: float = 0.0,
                     slots: tuple[Slot, ...] = ()) -> list[Used]:
        args: list = [member, int(tokens), repr(float(usd)), int(tool_calls), self._settle_ttl, repr(float(now))]
        for i in range(len(keys)):
            s = slots[i] if i < len(slots) else None
            args += [repr(float(s.bucket_s)), s.buckets] if s is not None and s.rolling else ["0", 0]
        res = await self._settle(keys=self._keys(keys), args=args)
        return [Used(int(res[i]), float(res[i + 1]), int(res[i + 2])) for i in range(0, len(res), 3)]

    async def release(self, rid: str, keys: tuple[str, ...], expires_at: float) -> int:
        return int(await self._release(keys=self._keys(keys), args=[rid, repr(expires_at)]))

    async def set_flag(self, key: str, ttl_s: float, now: float) -> bool:
        return bool(await self.r.set(f"{self.p}:f:{key}", "1", nx=True, px=max(1, int(ttl_s * 1000))))

    async def push_recent(self, key: str, value: str, n: int, ttl_s: float, now: float,
                          flag: str) -> tuple[list[str], bool]:
        k = f"{self.p}:l:{key}"
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.lpush(k, value).ltrim(k, 0, n - 1).pexpire(k, max(1, int(ttl_s * 1000))).lrange(k, 0, n - 1)
            pipe.exists(f"{self.p}:f:{flag}")
            res = await pipe.execute()
        return res[-2], bool(res[-1])

    async def kill_set(self, entry: str, value: str) -> None:
        await self.r.hset(f"{self.p}:kill", entry, value)

    async def kill_clear(self, entry: str) -> bool:
        return bool(await self.r.hdel(f"{self.p}:kill", entry))

    async def kill_all(self) -> dict[str, str]:
        return await self.r.hgetall(f"{self.p}:kill")

    async def record_spend(self, hour: int, fields: dict[str, float], series: tuple[str, ...], usd: float,
                           ttl_s: float) -> None:
        k = f"{self.p}:spend:{hour}"
        ttl = max(1, math.ceil(ttl_s))
        async with self.r.pipeline(transaction=False) as pipe:
            for f, v in fields.items():
                pipe.hincrbyfloat(k, f, v)
            pipe.expire(k, ttl)
            for name in series:
                hk = f"{self.p}:hourly:{name}"
                pipe.hincrbyfloat(hk, str(hour), usd).expire(hk, ttl)
            await pipe.execute()

    async def spend(self, hours: range) -> dict[str, float]:
        async with self.r.pipeline(transaction=False) as pipe:
            for h in hours:
                pipe.hgetall(f"{self.p}:spend:{h}")
            buckets = await pipe.execute()
        out: dict[str, float] = {}
        for b in buckets:
            for f, v in b.items():
                out[f] = out.get(f, 0.0) + float(v)
        return out

    async def hourly(self, series: str) -> dict[int, float]:
        raw = await self.r.hgetall(f"{self.p}:hourly:{series}")
        return {int(h): float(v) for h, v in raw.items()}

    async def rate_take(self, slots: list[RateSlot], rid: str, tokens: int, now: float) -> RateResult:
        keys = []
        for s in slots:
            keys += [f"{self.p}:rz:{s.key}", f"{self.p}:rs:{s.key}"]
        return ratelimit.parse_reply(await self._rate(keys=keys, args=ratelimit.redis_args(slots, rid, tokens, now)))

    async def add_fields(self, key: str, fields: dict[str, float], ttl_s: float, now: float) -> None:
        k = f"{self.p}:h:{key}"
        async with self.r.pipeline(transaction=False) as pipe:
            for f, v in fields.items():
                pipe.hincrbyfloat(k, f, v)
            pipe.expire(k, max(1, math.ceil(ttl_s)))
            await pipe.execute()

    async def read_fields(self, keys: list[str], now: float) -> list[dict[str, float]]:
        async with self.r.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(f"{self.p}:h:{key}")
            raw = await pipe.execute()
        return [{f: float(v) for f, v in h.items()} for h in raw]

    async def ping(self) -> None:
        await self.r.ping()

    async def close(self) -> None:
        await self.r.aclose()
