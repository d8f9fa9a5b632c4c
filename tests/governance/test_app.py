"""Governance through the router's HTTP surface, against the fake worker: keys, budgets,
streams cut or abandoned, the kill switch across replicas, loops, spend, concurrency."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from kvroute.benchmarks.backends.mock import SEEN, SEEN_HEADERS
from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.governance.store import MemoryStore
from tests.clock import FakeClock, until
from tests.governance.conftest import ADMIN, KEY_A, KEY_B, PATIENT, TENANTS, bearer, make_client, router_cfg, worker_url

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 50}
PRICE = {"input_per_m": 30.0, "output_per_m": 60.0}


def gov(client):
    return client.server.app[keys.GOVERNOR]


def estimate(client, body: dict) -> int:
    """The prompt tokens the router reserves for ``body`` (approximate mode: chars / 4)."""
    route = client.server.app[keys.ROUTES].get("tiny").tiers[0]
    return route.prefixer.keys_sync(body, 16).prompt_tokens


async def settled(client) -> None:
    await gov(client).drain()


def events(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e]


async def test_keys_tenants_and_spend_visibility(aiohttp_client, upstream, clock):
    client = await make_client(aiohttp_client, upstream, {"tenants": TENANTS, "admin_keys": [ADMIN]}, clock)
    for headers in ({}, bearer("sk-wrong"), {"Authorization": "Basic abc"}):
        resp = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_api_key"
    hdr = {"x-kvroute-agent": "planner", "x-kvroute-feature": "search"}
    assert (await client.post("/v1/chat/completions", json=CHAT, headers={**bearer(KEY_A), **hdr})).status == 200
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=bearer(KEY_B))).status == 200
    await settled(client)

    own = await (await client.get("/v1/kvroute/spend?group_by=tenant,agent,feature", headers=bearer(KEY_A))).json()
    assert [(r["tenant"], r["agent"], r["feature"], r["requests"]) for r in own["data"]] == \
        [("acme", "planner", "search", 1)]
    assert own["data"][0]["prompt_tokens"] == 11 and own["data"][0]["completion_tokens"] == 3
    resp = await client.get("/v1/kvroute/spend?tenant=globex", headers=bearer(KEY_A))
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "forbidden"
    assert (await client.get("/v1/kvroute/spend")).status == 401
    every = await (await client.get("/v1/kvroute/spend?group_by=tenant&window=1h", headers=bearer(ADMIN))).json()
    assert sorted(r["tenant"] for r in every["data"]) == ["acme", "globex"]
    assert (await client.get("/v1/kvroute/spend?group_by=colour", headers=bearer(ADMIN))).status == 400
    # tenant keys cannot use the admin API
    assert (await client.post("/v1/kvroute/admin/kill", json={}, headers=bearer(KEY_A))).status == 403
    assert (await client.post("/v1/kvroute/admin/kill", json={})).status == 401


async def test_open_router_traces_and_tags_every_request(aiohttp_client, upstream, clock):
    client = await make_client(aiohttp_client, upstream, {}, clock)
    tp = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    assert (await client.post("/v1/chat/completions", json=CHAT, headers={"traceparent": tp})).status == 200
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
    sent, generated = upstream.app[SEEN_HEADERS][-2:]
    assert sent["traceparent"] == tp
    assert generated["traceparent"].startswith("00-") and len(generated["traceparent"]) == 55
    # the max_tokens the client asked for is kept while the budgets allow it
    assert upstream.app[SEEN][-1]["max_tokens"] == 50
    body = {k: v for k, v in CHAT.items() if k != "max_tokens"}
    assert (await client.post("/v1/chat/completions", json=body)).status == 200
    assert upstream.app[SEEN][-1]["max_tokens"] == 1024  # governance.default_max_tokens
    await settled(client)
    metrics = (await (await client.get("/metrics")).read()).decode()
    assert 'kvroute_spend_tokens_total{agent="none",feature="none",kind="prompt",model="tiny",tenant="anonymous"}' \
        in metrics


async def test_a_spent_budget_is_429_naming_it_and_its_reset_and_max_tokens_shrinks_first(
        aiohttp_client, upstream, clock):
    budget = {"name": "acme-daily", "scope": "tenant", "window": "day", "limit": {"tokens": 100}}
    client = await make_client(aiohttp_client, upstream, {"tenants": TENANTS, "budgets": [budget]}, clock)
    body = {**CHAT, "fake_completion_tokens": 50, "fake_honor_max_tokens": True}
    assert (await client.post("/v1/chat/completions", json=body, headers=bearer(KEY_A))).status == 200
    await settled(client)  # used: 11 + 50
    assert (await client.post("/v1/chat/completions", json=body, headers=bearer(KEY_A))).status == 200
    assert 16 <= upstream.app[SEEN][-1]["max_tokens"] < 50  # shrunk to what the budget left
    await settled(client)
    resp = await client.post("/v1/chat/completions", json=body, headers=bearer(KEY_A))
    assert resp.status == 429
    err = (await resp.json())["error"]
    assert err["code"] == "budget_exceeded" and err["param"] == "acme-daily" and err["type"] == "insufficient_quota"
    assert "acme-daily" in err["message"] and "frees up at" in err["message"]
    assert 0 < int(resp.headers["retry-after"]) <= 86400 + 3600  # the rolling day plus one bucket
    # another tenant is not affected
    assert (await client.post("/v1/chat/completions", json=body, headers=bearer(KEY_B))).status == 200
    clock.advance(86400 + 3600)  # the rolling day (and its last one-hour bucket) has passed
    assert (await client.post("/v1/chat/completions", json=body, headers=bearer(KEY_A))).status == 200


async def test_a_stream_past_a_hard_limit_is_cut_cleanly_and_charged_for_what_was_generated(
        aiohttp_client, upstream, clock):
    budgets = [{"name": "per-call", "scope": "request", "limit": {"tokens": 60}},
               {"name": "day", "scope": "tenant", "window": "day", "limit": {"tokens": 100000}}]
    client = await make_client(aiohttp_client, upstream, {"budgets": budgets, "estimate_factor": 1}, clock)
    body = {**CHAT, "stream": True, "max_tokens": 500, "fake_completion_tokens": 200}  # ignores max_tokens
    prompt = estimate(client, body)
    resp = await client.post("/v1/chat/completions", json=body)
    text = (await resp.read()).decode()
    evs = events(text)
    last = orjson.loads(evs[-1][6:])
    assert last["error"]["code"] == "budget_exceeded" and last["error"]["param"] == "per-call"
    granted = 60 - prompt
    assert len(evs) - 1 == granted  # every chunk the budget allowed, then the error
    assert upstream.app[SEEN][-1]["max_tokens"] == granted
    await settled(client)
    store: MemoryStore = gov(client).store
    state = next(s for k, s in store._states.items() if k.startswith("day:"))
    assert state.used_t == prompt + granted + 1 and state.res_t == 0 and not state.reservations
    assert gov(client).metrics.governance_actions.labels("stream_cut")._value.get() == 1


async def test_a_client_that_leaves_mid_stream_is_charged_for_what_was_generated_and_leaks_nothing(
        aiohttp_client, upstream, clock):
    budgets = [{"name": "day", "scope": "tenant", "window": "day", "limit": {"tokens": 100000}}]
    client = await make_client(aiohttp_client, upstream, {"budgets": budgets}, clock)
    body = {**CHAT, "stream": True, "max_tokens": 400, "fake_completion_tokens": 400, "fake_chunk_delay_s": 0.005}
    prompt = estimate(client, body)
    resp = await client.post("/v1/chat/completions", json=body)
    got = 0
    async for _line in resp.content:
        got += 1
        if got >= 10:
            break
    resp.close()
    store: MemoryStore = gov(client).store

    async def settled_state():
        await settled(client)
        state = next((s for k, s in store._states.items() if k.startswith("day:")), None)
        return state is not None and state.used_t > 0

    await until(settled_state)  # only the network decides when the router sees the client leave
    state = next(s for k, s in store._states.items() if k.startswith("day:"))
    assert state.res_t == 0 and not state.reservations
    generated = state.used_t - prompt
    assert 5 <= generated < 400  # what the worker produced before the router saw the client leave


async def test_kill_switch_set_on_one_replica_halts_the_other_within_its_ttl(aiohttp_client, upstream, redis_url,
                                                                              prefix):
    clock = FakeClock()
    governance = {"admin_keys": [ADMIN], "redis": {"url": redis_url, "prefix": prefix, **PATIENT},
                  "kill_switch": {"ttl_s": 1}}
    a = await make_client(aiohttp_client, upstream, governance, clock)
    b = await make_client(aiohttp_client, upstream, governance, clock)
    crawler = {"x-kvroute-agent": "crawler"}
    assert (await b.post("/v1/chat/completions", json=CHAT, headers=crawler)).status == 200
    resp = await a.post("/v1/kvroute/admin/kill", headers=bearer(ADMIN),
                        json={"scope": "agent", "value": "crawler", "reason": "runaway tool loop"})
    assert resp.status == 200 and (await resp.json())["data"][0]["value"] == "crawler"
    clock.advance(1.01)
    resp = await b.post("/v1/chat/completions", json=CHAT, headers=crawler)
    assert resp.status == 503
    err = (await resp.json())["error"]
    assert err["code"] == "agent_halted" and "runaway tool loop" in err["message"]
    assert (await b.post("/v1/chat/completions", json=CHAT, headers={"x-kvroute-agent": "other"})).status == 200
    assert (await a.delete("/v1/kvroute/admin/kill?scope=agent&value=crawler", headers=bearer(ADMIN))).status == 200
    clock.advance(1.01)
    assert (await b.post("/v1/chat/completions", json=CHAT, headers=crawler)).status == 200
    # global, by model
    await a.post("/v1/kvroute/admin/kill", headers=bearer(ADMIN), json={"scope": "model", "value": "tiny"})
    clock.advance(1.01)
    assert (await b.post("/v1/chat/completions", json=CHAT)).status == 503
    await a.delete("/v1/kvroute/admin/kill", headers=bearer(ADMIN), json={"scope": "model", "value": "tiny"})


async def test_kill_switch_file_is_reread_within_its_ttl(aiohttp_client, upstream, clock, tmp_path):
    kill_file = tmp_path / "kill.yaml"
    client = await make_client(aiohttp_client, upstream, {"kill_switch": {"file": str(kill_file), "ttl_s": 2}},
                               clock)
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
    kill_file.write_text("- {scope: global, reason: incident 42}\n")
    clock.advance(2)
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 503 and "incident 42" in (await resp.json())["error"]["message"]
    kill_file.unlink()
    clock.advance(2)
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200


async def test_a_looping_agent_is_stopped_within_its_session_budget(aiohttp_client, upstream, clock):
    client = await make_client(aiohttp_client, upstream, {"tenants": TENANTS}, clock, price=PRICE)
    session = {**bearer(KEY_A), "x-kvroute-session": "s-1", "x-kvroute-agent": "looper"}
    messages = [{"role": "user", "content": "find the invoice"}]
    statuses = []
    for i in range(20):
        body = {"model": "tiny", "messages": messages, "max_tokens": 500, "fake_completion_tokens": 500,
                "fake_prompt_tokens": 2000, "fake_tool_call": "search"}
        resp = await client.post("/v1/chat/completions", json=body, headers=session)
        statuses.append(resp.status)
        if resp.status != 200:
            err = (await resp.json())["error"]
            break
        call = {"id": f"c{i}", "type": "function", "function": {"name": "search", "arguments": '{"q": "invoice"}'}}
        messages = [*messages, {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": f"c{i}", "content": f"no results (attempt {i})"}]
        await settled(client)
        clock.advance(1)
    assert err["code"] == "loop_detected" and statuses[-1] == 429
    await settled(client)
    spend = await (await client.get("/v1/kvroute/spend", headers=bearer(KEY_A))).json()
    assert spend["data"][0]["cost_usd"] <= 0.50
    # the session stays halted; a new session is fine
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=session)).status == 429
    fresh = {**session, "x-kvroute-session": "s-2"}
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=fresh)).status == 200
    assert [a["kind"] for a in gov(client).alerts.fired].count("loop_detected") == 1


async def test_a_session_budget_stops_a_runaway_agent_without_loop_detection(aiohttp_client, upstream, clock):
    client = await make_client(aiohttp_client, upstream, {"loops": {"action": "flag"}}, clock, price=PRICE)
    session = {"x-kvroute-session": "s-9"}
    statuses = []
    for _ in range(30):
        body = {**CHAT, "max_tokens": 1000, "fake_completion_tokens": 1000, "fake_honor_max_tokens": True}
        body["fake_prompt_tokens"] = estimate(client, body)
        resp = await client.post("/v1/chat/completions", json=body, headers=session)
        statuses.append(resp.status)
        await settled(client)
        if resp.status == 429:
            assert (await resp.json())["error"]["param"] == "session-default"
            break
    assert statuses[-1] == 429
    spend = await (await client.get("/v1/kvroute/spend")).json()
    assert spend["data"][0]["cost_usd"] <= 0.50


async def test_fifty_concurrent_requests_over_two_replicas_sharing_redis_stay_within_the_budget(
        aiohttp_client, upstream, redis_url, prefix):
    clock = FakeClock()
    limit = 3000
    governance = {"redis": {"url": redis_url, "prefix": prefix, **PATIENT}, "session_id": {"derive": "off"},
                  "budgets": [{"name": "team", "scope": "tenant", "window": "day", "limit": {"tokens": limit}}]}
    a = await make_client(aiohttp_client, upstream, governance, clock)
    b = await make_client(aiohttp_client, upstream, governance, clock)
    body = {**CHAT, "max_tokens": 100, "fake_completion_tokens": 100, "fake_honor_max_tokens": True}
    body["fake_prompt_tokens"] = prompt = estimate(a, body)

    results = await asyncio.gather(*(
        (a if i % 2 else b).post("/v1/chat/completions", json=body) for i in range(50)))
    statuses = [r.status for r in results]
    await settled(a)
    await settled(b)
    state = await gov(a).store.budget("team:anonymous:86400/24")
    used = int(state["used_t"])
    assert used <= limit  # over by at most one reservation: here, not at all
    assert used >= limit - (prompt + 100)  # and the budget was spent, not refused early
    assert int(state["res_t"]) == 0
    assert statuses.count(200) >= limit // (prompt + 100) and set(statuses) <= {200, 429}


async def test_fifty_concurrent_requests_in_memory_stay_within_the_budget(aiohttp_client, upstream, clock):
    limit = 3000
    governance = {"budgets": [{"name": "team", "scope": "global", "window_s": 3600, "limit": {"tokens": limit}}],
                  "session_id": {"derive": "off"}}  # fifty identical prompts are not a loop here
    client = await make_client(aiohttp_client, upstream, governance, clock)
    body = {**CHAT, "stream": True, "max_tokens": 100, "fake_completion_tokens": 100, "fake_honor_max_tokens": True}
    body["fake_prompt_tokens"] = estimate(client, body)
    results = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(50)))
    for r in results:
        await r.read()
    await settled(client)
    state = next(iter(gov(client).store._states.values()))
    assert limit - 200 <= state.used_t <= limit and state.res_t == 0


async def test_governance_config_errors_name_the_key():
    from kvroute.router.errors import ConfigError

    with pytest.raises(ConfigError, match=r"governance.budgets\[0\].scope"):
        router_cfg(["http://127.0.0.1:1"], {"budgets": [{"name": "x", "scope": "planet", "limit": {"tokens": 1}}]})
    with pytest.raises(ConfigError, match=r"governance.kill_switch.ttl_s"):
        router_cfg(["http://127.0.0.1:1"], {"kill_switch": {"ttl_s": 30}})
    cfg = router_cfg(["http://127.0.0.1:1"], {})
    session = cfg.governance.budgets[0]
    assert (session.limits.tokens, session.limits.usd, session.limits.tool_calls, session.limits.wall_s) == \
        (20_000, 0.5, 15, 120.0)
    assert create_app(router_cfg(["http://127.0.0.1:1"], {})).get(keys.GOVERNOR) is not None
    assert worker_url  # imported for other modules' use
