"""Governance for agent fleets through the HTTP surface: sessions derived for unlabelled
agents, named limits per agent, rate limits, over one router or two replicas sharing a
real Redis."""

from __future__ import annotations

import asyncio
import logging
import uuid

import orjson

from kvroute.router import keys
from tests.clock import FakeClock
from tests.governance.conftest import KEY_A, KEY_B, PATIENT, TENANTS, bearer, make_client

PRICE = {"input_per_m": 1.0, "output_per_m": 100.0}  # $0.0001 per completion token


def gov(client):
    return client.server.app[keys.GOVERNOR]


async def post(client, body: dict, **headers):
    return await client.post("/v1/chat/completions", json=body, headers=headers)


def chat(text: str, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 20, **extra}


# ---- protection without labels ----------------------------------------------------------


async def test_eight_identical_unlabelled_requests_are_halted_as_a_loop(aiohttp_client, upstream, clock, caplog):
    client = await make_client(aiohttp_client, upstream, {"tenants": TENANTS}, clock)
    statuses = []
    with caplog.at_level(logging.INFO, logger="kvroute.spend"):
        for _ in range(8):
            resp = await post(client, chat("list the files again"), **bearer(KEY_A))
            statuses.append(resp.status)
            await gov(client).drain()
    assert statuses[:4] == [200] * 4 and statuses[4:] == [429] * 4  # the 5th completes the loop window
    err = (await resp.json())["error"]
    assert err["code"] == "loop_detected" and "name a session" in err["message"]
    records = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "kvroute.spend"]
    assert {r["session_source"] for r in records} == {"fingerprint"}
    assert len({r["session"] for r in records}) == 1 and records[0]["session"].startswith("fp:")
    # another key's identical conversation is another session; a named session is its own too
    assert (await post(client, chat("list the files again"), **bearer(KEY_B))).status == 200
    resp = await post(client, chat("list the files again"), **bearer(KEY_A), **{"x-kvroute-session": "s1"})
    assert resp.status == 200


async def test_twenty_unlabelled_tool_calls_are_stopped(aiohttp_client, upstream, clock):
    """The audit's case: an agent calling one tool over and over, a growing conversation, no labels."""
    client = await make_client(aiohttp_client, upstream, {"loops": {"action": "flag"}}, clock)
    messages = [{"role": "system", "content": "You are a crawler."}, {"role": "user", "content": "find it"}]
    statuses = []
    for i in range(20):
        body = {"model": "tiny", "messages": messages, "max_tokens": 10, "fake_completion_tokens": 5,
                "fake_tool_call": f"tool{i}"}  # a different tool each time: no loop, only the tool-call limit
        resp = await post(client, body)
        statuses.append(resp.status)
        await gov(client).drain()
        if resp.status != 200:
            break
        call = {"id": f"c{i}", "type": "function", "function": {"name": f"tool{i}", "arguments": "{}"}}
        messages = [*messages, {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": f"c{i}", "content": f"result {i}"}]
    assert statuses == [200] * 15 + [429]  # session-default: 15 tool calls
    err = (await resp.json())["error"]
    assert err["param"] == "session-default" and "tool-call limit" in err["message"]


async def test_a_trace_id_is_a_session_and_derivation_can_be_turned_off(aiohttp_client, upstream, clock):
    client = await make_client(aiohttp_client, upstream, {"session_id": {"derive": ["trace"]}}, clock)
    trace = "00-" + "c" * 32 + "-" + "d" * 16 + "-01"
    statuses = [(await post(client, chat(f"step {i}"), traceparent=trace)).status for i in range(6)]
    assert statuses == [200] * 4 + [429] * 2  # "step <n>" normalizes to one prompt: a loop in one trace
    # without a traceparent, and with fingerprints off, nothing is derived: no loop check
    assert all([(await post(client, chat("same"))).status == 200 for _ in range(8)])
    off = await make_client(aiohttp_client, upstream, {"session_id": {"derive": "off"}}, clock)
    assert all([(await post(off, chat("same"))).status == 200 for _ in range(8)])


async def test_an_unlabelled_looping_agent_is_halted_across_two_replicas(aiohttp_client, upstream, redis_url,
                                                                         prefix):
    clock = FakeClock()
    governance = {"tenants": TENANTS, "redis": {"url": redis_url, "prefix": prefix, **PATIENT}}
    a = await make_client(aiohttp_client, upstream, governance, clock)
    b = await make_client(aiohttp_client, upstream, governance, clock)
    statuses = []
    for i in range(8):  # a load balancer spreads the agent's calls over both replicas
        statuses.append((await post(a if i % 2 else b, chat("retry the build"), **bearer(KEY_A))).status)
    assert statuses == [200] * 4 + [429] * 4
    assert (await post(a, chat("retry the build"), **bearer(KEY_B))).status == 200


# ---- named limits ----------------------------------------------------------------------


NAMED = [{"name": "research", "scope": "agent", "match": {"agent": "research"}, "limit": {"usd": 2}},
         {"name": "summariser", "scope": "agent", "match": {"agent": ["summariser", "summarizer"]},
          "limit": {"usd": 0.2}},
         {"name": "any-agent", "scope": "agent", "window": "day", "limit": {"usd": 50}}]


async def test_named_agent_limits_hold_exactly_under_fifty_concurrent_requests_on_two_replicas(
        aiohttp_client, upstream, redis_url, prefix):
    clock = FakeClock()
    governance = {"redis": {"url": redis_url, "prefix": prefix, **PATIENT}, "budgets": NAMED}
    a = await make_client(aiohttp_client, upstream, governance, clock, price=PRICE)
    b = await make_client(aiohttp_client, upstream, governance, clock, price=PRICE)
    # 1000 completion tokens: $0.10 a request (plus its prompt)
    body = chat("go", max_tokens=1000, fake_completion_tokens=1000, fake_honor_max_tokens=True,
                fake_prompt_tokens=2)

    async def one(i: int, agent: str) -> int:
        headers = {"x-kvroute-agent": agent, "x-kvroute-session": uuid.uuid4().hex}
        return (await post(a if i % 2 else b, body, **headers)).status

    statuses = await asyncio.gather(*(one(i, "research") for i in range(50)),
                                    *(one(i, "summariser") for i in range(50)),
                                    *(one(i, "writer") for i in range(10)))
    await gov(a).drain()
    await gov(b).drain()
    research = await gov(a).store.budget("research:anonymous/research")
    summariser = await gov(a).store.budget("summariser:anonymous/summariser")
    one_request = 2 * 1e-6 + 1000 * 1e-4
    assert 2 - one_request <= float(research["used_usd"]) <= 2 + 1e-9  # spent, never over
    assert 0.2 - one_request <= float(summariser["used_usd"]) <= 0.2 + 1e-9
    assert int(research["res_t"]) == 0 and int(summariser["res_t"]) == 0
    assert set(statuses[:100]) == {200, 429} and statuses[100:] == [200] * 10  # no named limit for writer
    # the general per-agent budget counted every agent too: all matching budgets apply
    writer = await gov(a).store.budget("any-agent:anonymous/writer:86400/24")
    assert abs(float(writer["used_usd"]) - 10 * one_request) < 1e-9


async def test_a_tenant_override_replaces_the_default_session_limits(aiohttp_client, upstream, clock):
    budgets = [{"name": "acme-sessions", "scope": "session", "match": {"tenant": "acme"},
                "limit": {"tool_calls": 2}, "overrides": ["session-default"]}]
    client = await make_client(aiohttp_client, upstream, {"tenants": TENANTS, "budgets": budgets}, clock)
    tools = chat("x", fake_completion_tokens=1, fake_tool_call="search", max_tokens=5)
    for key, expected in ((KEY_A, [200, 200, 429]), (KEY_B, [200, 200, 200])):
        got = []
        for i in range(3):
            body = {**tools, "messages": [{"role": "user", "content": f"task {'abc'[i]}"}]}
            got.append((await post(client, body, **bearer(key), **{"x-kvroute-session": "s"})).status)
            await gov(client).drain()
        assert got == expected, key
    resp = await post(client, tools, **bearer(KEY_A), **{"x-kvroute-session": "s"})
    assert (await resp.json())["error"]["param"] == "acme-sessions"


# ---- rate limits ---------------------------------------------------------------------


async def test_rate_limits_hold_across_two_replicas_with_openai_headers(aiohttp_client, upstream, redis_url,
                                                                         prefix):
    clock = FakeClock()
    governance = {"tenants": TENANTS, "redis": {"url": redis_url, "prefix": prefix, **PATIENT},
                  "rate_limits": [{"name": "per-key", "per": "key", "requests_per_minute": 20}]}
    a = await make_client(aiohttp_client, upstream, governance, clock)
    b = await make_client(aiohttp_client, upstream, governance, clock)

    async def one(i: int):
        resp = await post(a if i % 2 else b, chat(f"q{'abcdefghij'[i % 10]}{i}"), **bearer(KEY_A),
                          **{"x-kvroute-session": f"s{i}"})
        return resp.status, resp.headers, await resp.json()

    results = await asyncio.gather(*(one(i) for i in range(50)))
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) == 20 and statuses.count(429) == 30
    _, headers, body = next(r for r in results if r[0] == 429)
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests"
    assert body["error"]["param"] == "per-key"
    assert headers["retry-after"] == "60" and headers["x-ratelimit-limit-requests"] == "20"
    assert headers["x-ratelimit-remaining-requests"] == "0" and headers["x-ratelimit-reset-requests"] == "1m0s"
    # another key has its own window; the window slides
    assert (await post(a, chat("other"), **bearer(KEY_B))).status == 200
    clock.advance(30)
    assert (await post(b, chat("later"), **bearer(KEY_A), **{"x-kvroute-session": "t1"})).status == 429
    clock.advance(30.01)
    assert (await post(b, chat("later"), **bearer(KEY_A), **{"x-kvroute-session": "t2"})).status == 200


async def test_tokens_per_minute_per_agent_in_memory(aiohttp_client, upstream, clock):
    governance = {"rate_limits": [{"name": "agent-tpm", "per": "agent", "tokens_per_minute": 1000,
                                   "match": {"agent": "crawler"}}], "session_id": {"derive": "off"}}
    client = await make_client(aiohttp_client, upstream, governance, clock)
    body = chat("hello", max_tokens=300)  # prompt estimate + 300 tokens each
    crawler = {"x-kvroute-agent": "crawler"}
    statuses = [(await post(client, body, **crawler)).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    resp = await post(client, body, **crawler)
    assert resp.headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) < 300
    assert (await resp.json())["error"]["type"] == "tokens"
    assert (await post(client, body, **{"x-kvroute-agent": "writer"})).status == 200  # not matched
    too_big = chat("hello", max_tokens=5000)
    clock.advance(61)
    resp = await post(client, too_big, **crawler)
    assert resp.status == 429 and "retry-after" not in resp.headers
    assert "lower max_tokens" in (await resp.json())["error"]["message"]
    assert (await post(client, body, **crawler)).status == 200
