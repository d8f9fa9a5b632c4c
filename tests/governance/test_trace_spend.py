"""Cost rolled up by trace and session: ``group_by=trace_id|session`` and
``GET /v1/kvroute/spend/traces/{trace_id}``, in memory and across two replicas on a real Redis."""

from __future__ import annotations

import pytest

from kvroute.router import keys
from kvroute.router.app import create_app
from tests.governance.conftest import ADMIN, KEY_A, KEY_B, PATIENT, TENANTS, bearer, router_cfg, worker_url

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 50}
PRICE = {"input_per_m": 30.0, "output_per_m": 60.0}
ONE = (11 * 30.0 + 3 * 60.0) / 1e6  # the fake worker's usage: 11 prompt (5 cached), 3 completion tokens


def traceparent(span: str) -> str:
    return f"00-{TRACE}-{span}-01"


@pytest.fixture(params=["memory", "redis"])
def governance(request, prefix) -> dict:
    gov = {"tenants": TENANTS, "admin_keys": [ADMIN]}
    if request.param == "redis":
        gov["redis"] = {"url": request.getfixturevalue("redis_url"), "prefix": prefix, **PATIENT}
    return gov


async def test_two_agents_in_one_trace_roll_up_to_one_cost(aiohttp_client, upstream, clock, governance):
    price = {**PRICE, "cached_input_per_m": 30.0}
    apps = [create_app(router_cfg([worker_url(upstream)], governance, price=price), clock=clock) for _ in range(2)]
    shared = "redis" in governance
    clients = [await aiohttp_client(app) for app in (apps if shared else apps[:1])]
    planner, coder = clients[0], clients[-1]  # two replicas when Redis shares the ledger
    for client, agent, span in ((planner, "planner", "00f067aa0ba902b7"), (coder, "coder", "00f067aa0ba902b8"),
                                (coder, "coder", "00f067aa0ba902b9")):
        headers = {**bearer(KEY_A), "traceparent": traceparent(span), "x-kvroute-agent": agent,
                   "x-kvroute-session": "conv-1"}
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=headers)).status == 200
    assert (await planner.post("/v1/chat/completions", json=CHAT,  # another trace, another tenant
                               headers={**bearer(KEY_B), "x-kvroute-session": "conv-2"})).status == 200
    for client in clients:
        await client.server.app[keys.GOVERNOR].drain()

    resp = await planner.get(f"/v1/kvroute/spend/traces/{TRACE}", headers=bearer(KEY_A))
    body = await resp.json()
    assert resp.status == 200 and body["trace_id"] == TRACE
    assert body["requests"] == 3 and body["prompt_tokens"] == 33 and body["completion_tokens"] == 9
    assert body["cost_usd"] == pytest.approx(3 * ONE)
    assert {(r["agent"], r["requests"]) for r in body["by"]} == {("planner", 1), ("coder", 2)}
    # Another tenant's key does not see it; an admin does; junk is a 400.
    assert (await coder.get(f"/v1/kvroute/spend/traces/{TRACE}", headers=bearer(KEY_B))).status == 404
    assert (await coder.get(f"/v1/kvroute/spend/traces/{TRACE}", headers=bearer(ADMIN))).status == 200
    assert (await coder.get(f"/v1/kvroute/spend/traces/{'0' * 32}", headers=bearer(ADMIN))).status == 404
    bad = await coder.get("/v1/kvroute/spend/traces/not-a-trace", headers=bearer(ADMIN))
    assert bad.status == 400 and (await bad.json())["error"]["param"] == "trace_id"

    by_trace = await (await planner.get("/v1/kvroute/spend?group_by=trace_id,agent", headers=bearer(KEY_A))).json()
    assert {(r["trace_id"], r["agent"], r["requests"]) for r in by_trace["data"]} == \
        {(TRACE, "planner", 1), (TRACE, "coder", 2)}
    by_session = await (await planner.get("/v1/kvroute/spend?group_by=tenant,session",
                                          headers=bearer(ADMIN))).json()
    assert {(r["tenant"], r["session"], r["requests"]) for r in by_session["data"]} == \
        {("acme", "conv-1", 3), ("globex", "conv-2", 1)}
    too_long = await planner.get("/v1/kvroute/spend?group_by=session&window=week", headers=bearer(ADMIN))
    assert too_long.status == 400 and (await too_long.json())["error"]["param"] == "window"
