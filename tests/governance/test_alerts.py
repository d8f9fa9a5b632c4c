"""Alerts fire once per threshold per window, on spikes, and reach a webhook with retries."""

from __future__ import annotations

from aiohttp import web

from kvroute.router import keys
from tests.clock import FakeClock, until
from tests.governance.conftest import PATIENT, make_client

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 300,
        "fake_completion_tokens": 289, "fake_honor_max_tokens": True}  # 11 + 289 = 300 tokens a request


def kinds(client) -> list[str]:
    return [a["kind"] for a in client.server.app[keys.GOVERNOR].alerts.fired]


async def send(client, n: int = 1, **headers) -> None:
    for _ in range(n):
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=headers)).status == 200
        await client.server.app[keys.GOVERNOR].drain()


async def test_thresholds_fire_exactly_once_per_window(aiohttp_client, upstream, clock):
    budget = {"name": "daily", "scope": "tenant", "window": "day", "limit": {"tokens": 1000}, "soft": True}
    client = await make_client(aiohttp_client, upstream, {"budgets": [budget], "session_id": {"derive": "off"}}, clock)
    await send(client, 2)  # 60%
    assert kinds(client) == []
    await send(client)  # 90%
    assert kinds(client) == ["threshold_70"]
    await send(client)  # 120%: soft, so it went through
    assert kinds(client) == ["threshold_70", "threshold_100", "threshold_120"]
    await send(client, 3)
    assert kinds(client) == ["threshold_70", "threshold_100", "threshold_120"]
    clock.advance(86400 + 3600)  # the rolling day (24 one-hour buckets) has forgotten all of it
    await send(client, 3)
    assert kinds(client)[3:] == ["threshold_70"]
    metrics = (await (await client.get("/metrics")).read()).decode()
    assert 'kvroute_alerts_total{kind="threshold_70"} 2.0' in metrics
    assert 'kvroute_budget_used_ratio{budget="daily",key="anonymous"} 0.9' in metrics


async def test_thresholds_fire_once_across_two_replicas(aiohttp_client, upstream, redis_url, prefix):
    clock = FakeClock()
    governance = {"redis": {"url": redis_url, "prefix": prefix, **PATIENT}, "session_id": {"derive": "off"},
                  "budgets": [{"name": "daily", "scope": "global", "window": "day", "limit": {"tokens": 1000},
                               "soft": True}]}
    a = await make_client(aiohttp_client, upstream, governance, clock)
    b = await make_client(aiohttp_client, upstream, governance, clock)
    for client in (a, b, a, b, a):
        await send(client)
    assert sorted(kinds(a) + kinds(b)) == ["threshold_100", "threshold_120", "threshold_70"]


async def test_a_spend_spike_fires_once_per_hour(aiohttp_client, upstream, clock):
    governance = {"alerts": {"thresholds": [10.0]}, "session_id": {"derive": "off"}}
    client = await make_client(aiohttp_client, upstream, governance, clock, price={"output_per_m": 10.0})
    clock.now = 3600 * 500_000 + 10  # the start of an hour
    for _ in range(6):  # six quiet hours, one request each
        await send(client)
        clock.advance(3600)
    assert kinds(client) == []
    for _ in range(4):  # this hour: four times the hourly average
        await send(client)
        clock.advance(61)
    assert kinds(client) == ["spend_spike"]
    await send(client, 3)
    assert kinds(client) == ["spend_spike"]


async def test_the_webhook_gets_alerts_with_retries_and_never_blocks_requests(aiohttp_client, aiohttp_server,
                                                                           upstream, clock):
    received: list[dict] = []
    calls = []

    async def hook(request: web.Request) -> web.Response:
        calls.append(1)
        if len(calls) == 1:
            return web.Response(status=500)  # the first try fails
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app)
    budget = {"name": "daily", "scope": "tenant", "window": "day", "limit": {"tokens": 1000}}
    governance = {"budgets": [budget], "alerts": {"webhook_url": str(server.make_url("/hook")),
                                                  "webhook_retries": 2}}
    client = await make_client(aiohttp_client, upstream, governance, clock)
    await send(client, 3)
    await until(lambda: received)  # the webhook task posts, and retries after clock.sleep(0.5)
    assert [r["kind"] for r in received] == ["threshold_70"] and received[0]["budget"] == "daily"
    assert len(calls) == 2 and clock.slept == [0.5]
