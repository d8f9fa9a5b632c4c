"""The Governor facade on its own, with two instances sharing one Redis (two replicas)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import orjson
import pytest

from kvroute.router.errors import AgentHalted, BudgetExceeded
from kvroute.router.governance.governor import Governor
from kvroute.router.governance.redis_store import RedisStore
from kvroute.router.metrics import RouterMetrics
from kvroute.router.requests import CHAT, parse_request
from kvroute.router.routes import ModelRoutes
from tests.clock import FakeClock
from tests.governance.conftest import PATIENT, router_cfg

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 100}


async def setup(governance: dict, n: int = 2, clock: FakeClock | None = None):
    # the same prompt many times over: without a session of its own it would be a loop
    cfg = router_cfg(["http://127.0.0.1:1"], {"session_id": {"derive": "off"}, **governance})
    served = ModelRoutes(cfg).get("tiny")
    clock = clock or FakeClock()
    govs = [Governor(cfg.governance, RouterMetrics(), clock) for _ in range(n)]
    return govs, served, clock


async def admit(gov: Governor, served, body: dict = BODY, headers: dict | None = None):
    req = parse_request(CHAT, orjson.dumps(body), headers or {})
    route = served.tiers[0]
    ctx = await route.context(req)
    return await gov.admit(req, served, route, ctx, authorization=None)


def dispatch(grant, completion: int | None = None):
    if completion is None:
        return SimpleNamespace(usage=None, client_started=True, status="client_disconnected", worker=None)
    usage = {"prompt_tokens": grant.prompt_tokens, "completion_tokens": completion}
    return SimpleNamespace(usage=usage, client_started=True, status="ok", worker=None)


async def test_fifty_concurrent_admissions_on_two_governors_never_overspend(redis_url, prefix):
    limit = 2000
    budget = {"name": "team", "scope": "global", "window": "day", "limit": {"tokens": limit}}
    (a, b), served, clock = await setup({"redis": {"url": redis_url, "prefix": prefix, **PATIENT}, "budgets": [budget]})

    async def one(i: int) -> int:
        gov = a if i % 2 else b
        try:
            grant = await admit(gov, served)
        except BudgetExceeded:
            return 0
        for _ in range(i % 5):  # finish in a mixed order, interleaved with other admissions
            await asyncio.sleep(0)
        gov.finish(grant, dispatch(grant, grant.reserved.completion))  # the worst case: all it reserved
        return grant.prompt_tokens + grant.reserved.completion

    charged = await asyncio.gather(*(one(i) for i in range(50)))
    await a.drain()
    await b.drain()
    state = await a.store.budget("team:*:86400/24")
    assert int(state["used_t"]) == sum(charged) <= limit and int(state["res_t"]) == 0
    per_request = max(charged)
    assert limit - per_request <= int(state["used_t"])
    for g in (a, b):
        await g.close()


async def test_a_cut_or_abandoned_stream_is_charged_for_its_tokens_and_frees_its_reservation(redis_url, prefix):
    budget = {"name": "team", "scope": "global", "window": "day", "limit": {"tokens": 10_000}}
    redis = {"url": redis_url, "prefix": prefix, **PATIENT}
    (gov,), served, clock = await setup({"redis": redis, "budgets": [budget]}, n=1)
    grant = await admit(gov, served, {**BODY, "max_tokens": 40, "stream": True})
    assert all(grant.on_stream_tokens(1) for _ in range(40))
    assert not grant.on_stream_tokens(1)  # the 41st token crosses what was reserved
    assert grant.cut.code == "budget_exceeded"
    gov.finish(grant, dispatch(grant))
    gov.finish(grant, dispatch(grant))  # settling twice charges once
    await gov.drain()
    key = "team:*:86400/24"
    state = await gov.store.budget(key)
    assert int(state["used_t"]) == grant.prompt_tokens + 41 and int(state["res_t"]) == 0
    assert await gov.store.reservations(key) == 0
    await gov.close()


async def test_kill_switch_reaches_the_other_governor_after_its_ttl_and_cuts_streams(redis_url, prefix):
    governance = {"redis": {"url": redis_url, "prefix": prefix, **PATIENT}, "kill_switch": {"ttl_s": 0.5}}
    (a, b), served, clock = await setup(governance)
    grant = await admit(b, served, headers={"x-kvroute-agent": "bot"})
    await a.kill.set("agent", "bot", "spent too much")
    assert grant.on_stream_tokens(1)  # b has not re-read yet
    clock.advance(0.5)
    with pytest.raises(AgentHalted, match="spent too much"):
        await admit(b, served, headers={"x-kvroute-agent": "bot"})
    assert not grant.on_stream_tokens(1) and grant.cut.code == "agent_halted"
    b.finish(grant, dispatch(grant))
    await b.drain()
    for g in (a, b):
        await g.close()


async def test_redis_down_is_a_clear_503(prefix):
    cfg = router_cfg(["http://127.0.0.1:1"], {"redis": {"url": "redis://127.0.0.1:1/0", "prefix": prefix}})
    served = ModelRoutes(cfg).get("tiny")
    gov = Governor(cfg.governance, RouterMetrics(), FakeClock(), RedisStore.from_url("redis://127.0.0.1:1/0"))
    from kvroute.router.errors import GovernanceUnavailable

    with pytest.raises(GovernanceUnavailable):
        await admit(gov, served)
    await gov.close()


async def test_downgrade_moves_to_the_cheaper_tier_when_the_dollar_budget_is_spent():
    tiers = [{"name": "small"}, {"name": "large", "price": {"input_per_m": 100.0, "output_per_m": 100.0}}]
    budget = {"name": "dollars", "scope": "tenant", "window": "day", "limit": {"usd": 0.005}, "action": "downgrade"}
    cfg = router_cfg(["http://127.0.0.1:1"], {"budgets": [budget]}, tiers=tiers)
    served = ModelRoutes(cfg).get("tiny")  # the classifier is never loaded: tiers are forced here
    gov = Governor(cfg.governance, RouterMetrics(), FakeClock())
    small, large = served.tiers

    async def admit_large():
        req = parse_request(CHAT, orjson.dumps({**BODY, "max_tokens": 40}), {})
        return await gov.admit(req, served, large, await large.context(req), authorization=None)

    first = await admit_large()
    assert first.route is large
    gov.finish(first, dispatch(first, 40))
    await gov.drain()  # about $0.0045 used: another large request no longer fits, a free one does
    second = await admit_large()
    assert second.route is small and second.reserved.completion == 40
    assert gov.metrics.governance_actions.labels("downgrade")._value.get() == 1


async def test_throttle_delays_requests_once_a_budget_is_mostly_spent():
    budget = {"name": "slow-down", "scope": "global", "window": "hour", "limit": {"tokens": 500},
              "action": "throttle", "throttle_at": 0.5, "throttle_delay_s": 3}
    (gov,), served, clock = await setup({"budgets": [budget]}, n=1)
    for _ in range(5):
        grant = await admit(gov, served)
        gov.finish(grant, dispatch(grant, 100))
        await gov.drain()
    assert clock.slept == [3, 3]  # the 4th and 5th requests found the budget over half spent
    assert gov.metrics.governance_actions.labels("throttle")._value.get() == 2


async def test_inject_asks_a_looping_agent_to_reconsider():
    (gov,), served, _ = await setup({"loops": {"action": "inject", "message": "Please reconsider."}}, n=1)
    grants = [await admit(gov, served, headers={"x-kvroute-session": "s"}) for _ in range(5)]
    assert [g.req.body["messages"][-1]["role"] for g in grants] == ["user"] * 4 + ["system"]
    assert grants[-1].req.body["messages"][-1]["content"] == "Please reconsider."
    for g in grants:
        gov.finish(g, None)
    await gov.drain()


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_rolling_day_budget_refuses_across_midnight_then_frees_up(backend, request, prefix):
    day = 1_800_000_000 // 86400 * 86400
    budget = {"name": "team", "scope": "global", "window": "day", "limit": {"tokens": 1000}}
    governance: dict = {"budgets": [budget]}
    if backend == "redis":
        governance["redis"] = {"url": request.getfixturevalue("redis_url"), "prefix": prefix}
    (gov,), served, clock = await setup(governance, n=1, clock=FakeClock(day + 1800))  # 00:30 UTC
    grant = await admit(gov, served, {**BODY, "max_tokens": 900})
    gov.finish(grant, dispatch(grant, 1000 - grant.prompt_tokens))  # the whole budget, at 00:30
    await gov.drain()
    for at in (day + 86340, day + 86400 + 1800):  # 23:59, and 00:30 the next day (a fixed day would allow it)
        clock.now = at
        with pytest.raises(BudgetExceeded, match="frees up at 2027-01-16T01:00:00Z") as exc:
            await admit(gov, served)
        assert exc.value.param == "team"
    clock.now = day + 90000  # 01:00 the next day: the 00:00-01:00 bucket has aged out
    grant = await admit(gov, served)
    assert grant.reserved.completion == 100
    gov.finish(grant, dispatch(grant, 100))
    await gov.drain()
    if backend == "redis":
        state = await gov.store.budget("team:*:86400/24")
        assert int(state["used_t"]) == grant.prompt_tokens + 100 and int(state["res_t"]) == 0
    await gov.close()


async def test_a_stream_is_cut_when_its_session_runs_out_of_wall_clock():
    (gov,), served, clock = await setup({}, n=1)
    headers = {"x-kvroute-session": "s-wall"}
    first = await admit(gov, served, {**BODY, "stream": True}, headers)
    assert first.reserved.deadline == clock.time() + 120
    clock.advance(60)
    grant = await admit(gov, served, {**BODY, "stream": True}, headers)
    assert grant.reserved.deadline == first.reserved.deadline  # counted from the session's first request
    assert grant.on_stream_tokens(1)
    clock.advance(61)
    assert not grant.on_stream_tokens(1) and grant.cut.code == "budget_exceeded"
    assert "wall-clock" in str(grant.cut) and grant.cut.param == "session-default"
    for g in (first, grant):
        gov.finish(g, dispatch(g, 1))
    await gov.drain()
    await gov.close()


@pytest.mark.timeout(30)  # a spinning drain never yields, so only the signal can stop it
async def test_drain_returns_when_a_settlement_finished_before_its_own_cleanup_ran():
    """A finished task leaves ``pending`` on a later loop turn. On Python 3.12+ gathering
    finished tasks returns without giving the loop that turn, and drain once spun forever."""
    govs, _, _ = await setup({}, n=1)
    gov = govs[0]

    async def settled() -> None:
        return None

    task = asyncio.get_running_loop().create_task(settled())
    gov.pending.add(task)
    task.add_done_callback(gov.pending.discard)
    await asyncio.sleep(0)  # the task runs and finishes; its discard waits for the next turn
    assert task.done() and task in gov.pending
    await asyncio.wait_for(gov.drain(), timeout=5)
    assert not gov.pending
