"""Store faults, against a real redis-server that stops answering (SIGSTOP: connections
open and requests are sent, and nothing replies) and comes back (SIGCONT): admission fails
fast, ``on_store_error`` decides what a request gets, the kill switch keeps working,
failures are counted, and everything recovers, timed-out reservations included.

Each test pauses its own redis-server (the session's one is shared). The governors read a
FakeClock; real time is only measured, to show that nothing waits longer than one
``redis.timeout_s`` (0.5 s by default), and polled, with a bound, for what only Redis and
the network decide.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import orjson
import pytest

from kvroute.benchmarks.governance_bench import RedisServer
from kvroute.router.errors import AgentHalted, ConfigError, GovernanceUnavailable, KvrouteError
from kvroute.router.governance.config import StoreErrorPolicy
from kvroute.router.governance.governor import Governor
from kvroute.router.governance.guard import PROBE_EVERY_S
from kvroute.router.governance.redis_store import RedisStore
from kvroute.router.governance.store import Ask, MemoryStore, Slot
from kvroute.router.metrics import RouterMetrics
from kvroute.router.requests import CHAT, parse_request
from kvroute.router.routes import ModelRoutes
from tests.clock import FakeClock, until
from tests.governance.conftest import ADMIN, bearer, make_client, router_cfg

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 100}
BUDGET = {"name": "team", "scope": "global", "window": "day", "limit": {"tokens": 100_000}}
KEY = "team:*:86400/24"
ONE_TIMEOUT_S = 0.9  # one redis.timeout_s (0.5 s) and some slack; a hang would be far longer
NO_ROUND_TRIP_S = 0.1  # a call while the store is known to be down does not touch it


@pytest.fixture
def server():
    s = RedisServer()
    yield s
    s.stop()  # resumes it first, whatever the test left


@pytest.fixture
async def governor(server, prefix):
    """Build governors on ``server``; each is closed at the end, also when the test fails."""
    made: list[Governor] = []

    def build(clock: FakeClock, **governance) -> tuple[Governor, object]:
        governance = {"redis": {"url": server.url, "prefix": prefix}, "budgets": [BUDGET],
                      "session_id": {"derive": "off"}, **governance}  # no loop check: the reserve meets Redis first
        cfg = router_cfg(["http://127.0.0.1:1"], governance)
        made.append(Governor(cfg.governance, RouterMetrics(), clock))
        return made[-1], ModelRoutes(cfg).get("tiny")

    yield build
    server.resume()
    for gov in made:
        await gov.close()


async def admit(gov: Governor, served, agent: str = "bot"):
    req = parse_request(CHAT, orjson.dumps(BODY), {"x-kvroute-agent": agent})
    route = served.tiers[0]
    return await gov.admit(req, served, route, await route.context(req), authorization=None)


async def timed(call) -> tuple[float, object]:
    """Seconds ``call`` took, and its result or the kvroute error it raised."""
    t0 = time.monotonic()
    try:
        result = await call
    except KvrouteError as exc:
        result = exc
    return time.monotonic() - t0, result


def done(grant, completion: int) -> SimpleNamespace:
    usage = {"prompt_tokens": grant.prompt_tokens, "completion_tokens": completion}
    return SimpleNamespace(usage=usage, client_started=True, status="ok", worker=None)


def errors(gov: Governor, op: str) -> float:
    return gov.metrics.store_errors.labels(op)._value.get()


async def phantom_ran(gov: Governor) -> None:
    """Wait until Redis, continued, has run the reserve whose reply timed out."""
    async def one() -> bool:
        return await gov.store.reservations(KEY) == 1
    await until(one)


async def back_up(gov: Governor, clock: FakeClock) -> None:
    """Wait until the guard's probe finds the store again. Each round moves past the probe
    interval and makes one call, as the kill-switch poller does on an idle replica."""
    async def up() -> bool:
        if gov.guarded.up:
            return True
        clock.advance(PROBE_EVERY_S)
        await gov.kill.refresh()  # never raises; while the store is down it starts a probe
        return gov.guarded.up
    await until(up)


async def test_a_hung_redis_fails_admission_fast_with_503_and_everything_recovers(server, governor):
    clock = FakeClock()
    gov, served = governor(clock)
    grant = await admit(gov, served)
    gov.finish(grant, done(grant, 10))
    await gov.drain()
    server.pause()
    took, err = await timed(admit(gov, served))
    assert isinstance(err, GovernanceUnavailable) and (err.status, err.code) == (503, "governance_unavailable")
    assert took < ONE_TIMEOUT_S  # the reserve waited one timeout, not for Redis
    took, err = await timed(admit(gov, served))
    assert isinstance(err, GovernanceUnavailable) and took < NO_ROUND_TRIP_S
    assert errors(gov, "reserve") == 2
    server.resume()
    await phantom_ran(gov)  # the timed-out reserve ran after all: a reservation nobody will settle
    await back_up(gov, clock)
    assert await gov.release_orphans() == 1
    assert await gov.store.reservations(KEY) == 0 and int((await gov.store.budget(KEY))["res_t"]) == 0
    grant = await admit(gov, served)
    assert not grant.reserved.unreserved and grant.reserved.tokens > 0
    assert errors(gov, "reserve") == 2
    gov.finish(grant, done(grant, 10))
    await gov.drain()
    assert int((await gov.store.budget(KEY))["used_t"]) == 2 * (grant.prompt_tokens + 10)


async def test_fail_open_admits_unreserved_and_charges_the_usage_once_redis_is_back(server, governor):
    clock = FakeClock()
    per_call = {"name": "per-call", "scope": "request", "limit": {"tokens": 60}}
    gov, served = governor(clock, budgets=[BUDGET, per_call],
                           on_store_error={"budgets": "fail_open"})
    before = await admit(gov, served)  # also reads the kill list once (see the kill-switch tests)
    gov.finish(before, done(before, 10))
    await gov.drain()
    server.pause()
    took, first = await timed(admit(gov, served))
    assert took < ONE_TIMEOUT_S
    took, second = await timed(admit(gov, served))
    assert took < NO_ROUND_TRIP_S
    for g in (first, second):
        assert not isinstance(g, KvrouteError) and g.reserved.unreserved and g.reserved.tokens == 0
        # a request budget needs no store: still enforced (on the prompt estimate times estimate_factor)
        assert g.req.max_tokens == 60 - gov.prompt_reserve(g.route, g.ctx)
    assert gov.metrics.governance_actions.labels("fail_open")._value.get() == 2
    assert errors(gov, "reserve") == 2
    lost = await admit(gov, served)
    gov.finish(lost, done(lost, 5))  # settled while Redis is down: not charged (best-effort, not queued)
    await gov.drain()
    assert errors(gov, "settle") == 1
    server.resume()
    await phantom_ran(gov)  # the first one's reserve timed out, and ran once Redis continued
    await back_up(gov, clock)
    for g in (first, second):
        gov.finish(g, done(g, 20))
    await gov.drain()
    state = await gov.store.budget(KEY)
    assert int(state["used_t"]) == before.prompt_tokens + 10 + 2 * (first.prompt_tokens + 20)
    # settling the first grant took its timed-out reservation back
    assert await gov.store.reservations(KEY) == 0 and int(state["res_t"]) == 0


@pytest.mark.parametrize("mode", ["fail_closed", "fail_open"])
async def test_the_kill_switch_while_redis_is_hung(server, governor, tmp_path, mode):
    kills = tmp_path / "kills.yaml"
    kills.write_text("- {scope: agent, value: file-bot, reason: from the file}\n")
    clock = FakeClock()
    gov, served = governor(clock, kill_switch={"ttl_s": 1, "file": str(kills)},
                           on_store_error={"budgets": "fail_open", "kill_switch": mode})
    await gov.kill.set("agent", "bot", "runaway")
    await gov.kill.refresh()  # this replica has read the whole list (its first request or poll does)
    server.pause()
    clock.advance(1)  # the list is due for a re-read, which times out
    took, result = await timed(admit(gov, served, agent="bot"))
    assert took < ONE_TIMEOUT_S
    if mode == "fail_closed":
        assert isinstance(result, AgentHalted) and "runaway" in result.message  # the last known list holds
    else:
        assert not isinstance(result, KvrouteError) and result.reserved.unreserved  # the store's list is ignored
        gov.finish(result, done(result, 1))
    with pytest.raises(AgentHalted, match="from the file"):  # file (and URL) entries apply in both modes
        await admit(gov, served, agent="file-bot")
    assert errors(gov, "kill_refresh") >= 1 and gov.kill.store_state == "stale"
    server.resume()
    await back_up(gov, clock)
    clock.advance(1)
    with pytest.raises(AgentHalted, match="runaway"):
        await admit(gov, served, agent="bot")
    assert gov.kill.store_state == "ok"
    await gov.kill.clear("agent", "bot")
    grant = await admit(gov, served, agent="bot")
    assert not grant.reserved.unreserved
    gov.finish(grant, done(grant, 1))
    await gov.drain()


@pytest.mark.parametrize("mode", ["fail_closed", "fail_open"])
async def test_a_replica_that_never_read_the_kill_list(server, governor, mode):
    """Started during the outage, it cannot know whether 'global' is set on the others."""
    server.pause()
    clock = FakeClock()
    gov, served = governor(clock, on_store_error={"budgets": "fail_open", "kill_switch": mode})
    took, result = await timed(admit(gov, served))
    assert took < ONE_TIMEOUT_S and gov.kill.store_state == "unknown"
    if mode == "fail_closed":
        assert isinstance(result, GovernanceUnavailable) and "kill switch" in result.message
        took, result = await timed(admit(gov, served))
        assert isinstance(result, GovernanceUnavailable) and took < NO_ROUND_TRIP_S
    else:
        assert not isinstance(result, KvrouteError) and result.reserved.unreserved
        gov.finish(result, done(result, 1))
    server.resume()
    await back_up(gov, clock)
    clock.advance(2)  # fail_open re-reads the list within kill_switch.ttl_s (fail_closed at once)
    grant = await admit(gov, served)
    assert not grant.reserved.unreserved and gov.kill.store_state == "ok"
    gov.finish(grant, done(grant, 1))
    await gov.drain()


async def test_over_http_a_paused_redis_is_a_quick_503_is_counted_and_recovers(aiohttp_client, upstream, server,
                                                                                 prefix):
    clock = FakeClock()
    # connect_timeout_s: the first connection of a loaded test machine is not an outage; the
    # pause below stalls reads on the open connection, which timeout_s (0.5 s) bounds.
    governance = {"admin_keys": [ADMIN], "redis": {"url": server.url, "prefix": prefix, "connect_timeout_s": 5},
                  "budgets": [BUDGET], "session_id": {"derive": "off"}}
    client = await make_client(aiohttp_client, upstream, governance, clock)
    assert (await client.post("/v1/chat/completions", json=BODY)).status == 200
    server.pause()
    try:
        t0 = time.monotonic()
        resp = await client.post("/v1/chat/completions", json=BODY)
        assert time.monotonic() - t0 < ONE_TIMEOUT_S
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "governance_unavailable"
        kill = await client.post("/v1/kvroute/admin/kill", json={"scope": "agent", "value": "x"},
                                 headers=bearer(ADMIN))
        assert kill.status == 503 and "kill_switch.file" in (await kill.json())["error"]["message"]
        listing = await (await client.get("/v1/kvroute/admin/kill", headers=bearer(ADMIN))).json()
        assert listing["store"] == "stale" and listing["data"] == []
        metrics = (await (await client.get("/metrics")).read()).decode()
        assert 'kvroute_store_errors_total{op="reserve"} 1.0' in metrics
        assert 'kvroute_store_errors_total{op="kill_admin"} 1.0' in metrics
    finally:
        server.resume()

    async def served() -> bool:
        clock.advance(PROBE_EVERY_S)  # a request after the probe interval starts a probe
        return (await client.post("/v1/chat/completions", json=BODY)).status == 200
    await until(served)
    listing = await (await client.get("/v1/kvroute/admin/kill", headers=bearer(ADMIN))).json()
    assert listing["store"] == "ok"


def test_store_fault_keys_default_and_are_checked_naming_the_key():
    cfg = router_cfg(["http://127.0.0.1:1"], {"redis": {"url": "redis://r:6379/0"}}).governance
    assert (cfg.redis.connect_timeout_s, cfg.redis.timeout_s) == (0.5, 0.5)
    assert cfg.on_store_error == StoreErrorPolicy(budgets="fail_closed", kill_switch="fail_closed")
    cfg = router_cfg(["http://127.0.0.1:1"], {
        "redis": {"url": "redis://r:6379/0", "connect_timeout_s": 1, "timeout_s": 0.25},
        "on_store_error": {"budgets": "fail_open", "kill_switch": "fail_open"}}).governance
    assert (cfg.redis.connect_timeout_s, cfg.redis.timeout_s) == (1.0, 0.25)
    assert cfg.on_store_error == StoreErrorPolicy(budgets="fail_open", kill_switch="fail_open")
    redis = {"url": "redis://r:6379/0"}
    for governance, key in [
        ({"on_store_error": {"budgets": "fail_soft"}}, "governance.on_store_error.budgets"),
        ({"on_store_error": {"kill_switch": True}}, "governance.on_store_error.kill_switch"),
        ({"on_store_error": {"loops": "fail_open"}}, "governance.on_store_error.loops"),
        ({"on_store_error": "fail_open"}, "governance.on_store_error"),
        ({"redis": {**redis, "timeout_s": 0}}, "governance.redis.timeout_s"),
        ({"redis": {**redis, "connect_timeout_s": 60}}, "governance.redis.connect_timeout_s"),
        ({"redis": {**redis, "timeout_s": "fast"}}, "governance.redis.timeout_s"),
    ]:
        with pytest.raises(ConfigError) as err:
            router_cfg(["http://127.0.0.1:1"], governance)
        assert err.value.key == key, str(err.value)


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_release_takes_back_one_requests_reservation_and_nothing_else(backend, request, prefix):
    store = MemoryStore() if backend == "memory" else RedisStore.from_url(request.getfixturevalue("redis_url"),
                                                                          prefix)
    now, slots = 1_800_000_000.0, (Slot("a", "a", tokens=10_000), Slot("b", "b", tokens=10_000))
    mine = await store.reserve(Ask("r1", slots, 100, 100, 16, 0.0, 0.0, now, 60.0))
    other = await store.reserve(Ask("r10", slots, 50, 50, 16, 0.0, 0.0, now, 60.0))  # shares a prefix, not the rid
    try:
        assert mine.ok and other.ok
        assert await store.release("r1", ("a", "b"), now + 60.0) == 2
        assert await store.release("r1", ("a", "b"), now + 60.0) == 0
        for key in ("a", "b"):
            if isinstance(store, MemoryStore):
                st = store.state(key)
                assert (st.res_t, list(st.reservations)) == (other.tokens, [other.member])
            else:
                assert int((await store.budget(key))["res_t"]) == other.tokens
                assert await store.reservations(key) == 1
    finally:
        await store.close()
