"""Reservations and settlement, the same on both stores: atomic, capped, never leaked."""

from __future__ import annotations

import asyncio

import pytest

from kvroute.router.governance.redis_store import RedisStore
from kvroute.router.governance.store import Ask, MemoryStore, Slot

NOW = 1_800_000_000.0


@pytest.fixture(params=["memory", "redis"])
async def store(request, prefix):
    if request.param == "memory":
        yield MemoryStore()
        return
    s = RedisStore.from_url(request.getfixturevalue("redis_url"), prefix)
    yield s
    await s.close()


def ask(slots, prompt=100, max_c=100, min_c=16, now=NOW, ttl=60.0, rid="r1", pin=0.0, pout=0.0):
    return Ask(rid, tuple(slots), prompt, max_c, min_c, pin, pout, now, ttl)


async def counters(store, key):
    if isinstance(store, MemoryStore):
        st = store.state(key)
        return st.used_t, st.res_t, len(st.reservations)
    b = await store.budget(key)
    return int(b.get("used_t", 0)), int(b.get("res_t", 0)), await store.reservations(key)


async def test_reserve_grants_what_the_tightest_budget_leaves_then_refuses(store):
    a, b = Slot("a", "a", tokens=1000), Slot("b", "b", tokens=450)
    g = await store.reserve(ask([a, b], prompt=100, max_c=500))
    assert g.ok and g.completion == 350 and g.tokens == 450 and g.failed == 1 and g.reason == "tokens"
    g2 = await store.reserve(ask([a, b], rid="r2"))
    assert not g2.ok and g2.failed == 1 and g2.reason == "tokens"
    assert g2.ratios == [pytest.approx(0.45), pytest.approx(1.0)]
    # nothing of the refused ask was reserved anywhere
    assert await counters(store, "a") == (0, 450, 1)
    used = await store.settle(g.member, ("a", "b"), g.tokens, g.usd, 130, 0.0, 2)
    assert [(u.tokens, u.tool_calls) for u in used] == [(130, 2), (130, 2)]
    assert await counters(store, "b") == (130, 0, 0)


async def test_dollar_limits_use_prices_and_a_free_tier_is_never_refused_on_dollars(store):
    slot = Slot("usd", "usd", usd=0.01)
    g = await store.reserve(ask([slot], prompt=1000, max_c=1000, pin=1e-6, pout=4e-6))
    assert g.ok and g.completion == 1000 and g.usd == pytest.approx(0.005)
    g2 = await store.reserve(ask([slot], rid="r2", prompt=1000, max_c=1000, pin=1e-6, pout=4e-6))
    assert g2.ok and g2.completion == 1000  # exactly fills it: 0.01
    g3 = await store.reserve(ask([slot], rid="r3", prompt=1000, max_c=1000, pin=1e-6, pout=4e-6))
    assert not g3.ok and g3.reason == "usd"
    g4 = await store.reserve(ask([slot], rid="r4", prompt=1000, max_c=1000))
    assert g4.ok  # free


async def test_an_unsettled_reservation_expires_and_settling_it_late_charges_once(store):
    slot = Slot("s", "s", tokens=300)
    g = await store.reserve(ask([slot], prompt=100, max_c=200, ttl=30))
    assert g.ok and not (await store.reserve(ask([slot], rid="r2", ttl=30))).ok
    later = await store.reserve(ask([slot], rid="r3", now=NOW + 31, ttl=30))  # r1 expired: room again
    assert later.ok
    await store.settle(g.member, ("s",), g.tokens, g.usd, 120, 0.0, 0)  # late: usage only
    await store.settle(later.member, ("s",), later.tokens, later.usd, 0, 0.0, 0)
    assert await counters(store, "s") == (120, 0, 0)


async def test_tool_call_and_wall_clock_limits(store):
    slot = Slot("sess", "sess", tool_calls=2, wall_s=120)
    g = await store.reserve(ask([slot]))
    await store.settle(g.member, ("sess",), g.tokens, g.usd, 10, 0.0, 2)
    refused = await store.reserve(ask([slot], rid="r2"))
    assert not refused.ok and refused.reason == "tool_calls"
    wall = Slot("w", "w", wall_s=120)
    assert (await store.reserve(ask([wall], rid="w1"))).ok
    assert (await store.reserve(ask([wall], rid="w2", now=NOW + 119))).ok
    late = await store.reserve(ask([wall], rid="w3", now=NOW + 121))
    assert not late.ok and late.reason == "wall_s"


async def test_soft_budgets_never_refuse(store):
    soft = Slot("soft", "soft", tokens=10, hard=False)
    g = await store.reserve(ask([soft], prompt=100, max_c=100))
    assert g.ok and g.completion == 100


async def test_fifty_concurrent_reservations_never_exceed_the_limit(store):
    slot = Slot("c", "c", tokens=5000)

    async def one(i):
        g = await store.reserve(ask([slot], rid=f"r{i}", prompt=100, max_c=200, min_c=200))
        if not g.ok:
            return 0
        await asyncio.sleep(0)
        await store.settle(g.member, ("c",), g.tokens, g.usd, g.tokens, 0.0, 0)
        return g.tokens

    charged = await asyncio.gather(*(one(i) for i in range(50)))
    used, reserved, open_ = await counters(store, "c")
    assert sum(charged) == used <= 5000 and reserved == 0 and open_ == 0
    assert used > 5000 - 300  # and the budget was used up, not refused early


async def test_flags_recent_lists_and_kill_entries(store):
    assert await store.set_flag("f", 10, NOW) and not await store.set_flag("f", 10, NOW)
    for v in "abcdef":
        entries, halted = await store.push_recent("l", v, 5, 60, NOW, "f")
    assert entries == ["f", "e", "d", "c", "b"] and halted
    await store.kill_set("agent:x", '{"reason": "r"}')
    assert await store.kill_all() == {"agent:x": '{"reason": "r"}'}
    assert await store.kill_clear("agent:x") and not await store.kill_clear("agent:x")


DAY = 1_800_000_000 // 86400 * 86400  # a UTC midnight
HOUR = 3600.0


async def test_a_rolling_day_remembers_use_across_midnight_until_its_bucket_ages_out(store):
    slot = Slot("roll", "roll", tokens=1000, bucket_s=HOUR, buckets=24)
    heavy = await store.reserve(ask([slot], prompt=100, max_c=800, now=DAY + 1800, ttl=7200.0))  # 00:30
    assert heavy.ok
    used = await store.settle(heavy.member, ("roll",), heavy.tokens, heavy.usd, 900, 0.0, 0, now=DAY + 5400,
                              slots=(slot,))  # settled at 01:30, into the 00:00-01:00 bucket it was reserved in
    assert used[0].tokens == 900
    for at in (DAY + 86340, DAY + 86400 + 600, DAY + 90000 - 1):  # 23:59, then 00:10 and 00:59:59 the next day
        late = await store.reserve(ask([slot], prompt=100, max_c=100, min_c=16, now=at, rid="late"))
        assert not late.ok and late.reason == "tokens" and late.failed == 0
        assert late.reset_at == DAY + 90000  # the 00:00 bucket leaves the window at 01:00 the next day
    fresh = await store.reserve(ask([slot], prompt=100, max_c=100, now=DAY + 90000, rid="fresh"))
    assert fresh.ok and fresh.completion == 100
    used = await store.settle(fresh.member, ("roll",), fresh.tokens, fresh.usd, 150, 0.0, 0, now=DAY + 90000,
                              slots=(slot,))
    assert used[0].tokens == 150  # the old bucket is gone; only the new use counts
    assert (await counters(store, "roll"))[1:] == (0, 0)


async def test_a_rolling_window_sums_every_live_bucket(store):
    slot = Slot("sum", "sum", tokens=1000, bucket_s=HOUR, buckets=24)
    for h in range(0, 30, 3):  # 300 tokens every three hours
        g = await store.reserve(ask([slot], prompt=300, max_c=0, min_c=0, now=DAY + h * HOUR, rid=f"r{h}"))
        if not g.ok:
            assert h == 9 and g.reset_at == DAY + 25 * HOUR
            break
        await store.settle(g.member, ("sum",), g.tokens, g.usd, 300, 0.0, 0, now=DAY + h * HOUR, slots=(slot,))
    else:
        raise AssertionError("the fourth 300-token use within a day should not fit 1000")
    g = await store.reserve(ask([slot], prompt=300, max_c=0, min_c=0, now=DAY + 25 * HOUR, rid="again"))
    assert g.ok  # 00:00 bucket gone: 600 used in the window, 300 more fits
