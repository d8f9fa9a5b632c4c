"""Alert routing: each alert kind to its own webhook receivers (a real aiohttp app), with
templated generic and Slack payloads, retries with backoff and dead letters; spikes per
agent; the budget gauge's bounded labels; the tokenizer-less safety factor."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from aiohttp import web

from kvroute.router import keys
from tests.clock import until
from tests.governance.conftest import make_client

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 300,
        "fake_completion_tokens": 289, "fake_honor_max_tokens": True}  # 11 + 289 = 300 tokens a request


async def receiver(aiohttp_server, fail: dict[str, int] | None = None):
    """Webhook receivers at /<name>; ``fail[name]`` first posts answer 500 (always, if -1)."""
    got: dict[str, list] = defaultdict(list)
    tries: dict[str, int] = defaultdict(int)
    fail = fail or {}

    async def hook(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        tries[name] += 1
        if fail.get(name, 0) == -1 or tries[name] <= fail.get(name, 0):
            return web.Response(status=500)
        got[name].append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{name}", hook)
    server = await aiohttp_server(app)
    return server, got, tries


def metric(client, name: str, *labels: str) -> float:
    return getattr(client.server.app[keys.METRICS], name).labels(*labels)._value.get()


async def test_each_alert_level_reaches_its_own_webhook(aiohttp_server, aiohttp_client, upstream, clock):
    server, got, tries = await receiver(aiohttp_server, fail={"oncall": 2, "broken": -1})
    url = lambda name: str(server.make_url(f"/{name}"))  # noqa: E731
    budget = {"name": "daily", "scope": "tenant", "window": "day", "limit": {"tokens": 1000}, "soft": True}
    alerts = {"webhook_retries": 2, "webhooks": [
        {"url": url("team"), "kinds": ["threshold_70"],
         "template": {"summary": "{budget} at {ratio}", "ratio": "{ratio}", "source": "kvroute"}},
        {"url": url("oncall"), "kinds": ["threshold_100"], "format": "slack",
         "template": ":fire: {budget} spent ({tokens} tokens)"},
        {"url": url("finance"), "kinds": ["threshold_120", "spend_spike"], "format": "slack"},
        {"url": url("agents"), "kinds": ["loop_detected"]},
        {"url": url("broken"), "kinds": ["threshold"]}]}
    client = await make_client(aiohttp_client, upstream, {"budgets": [budget], "alerts": alerts}, clock)
    gov = client.server.app[keys.GOVERNOR]
    for i in range(4):  # 30%, 60%, 90%, 120% (soft: alerts only)
        body = {**CHAT, "messages": [{"role": "user", "content": f"part {'abcd'[i]}"}]}
        assert (await client.post("/v1/chat/completions", json=body)).status == 200
        await gov.drain()
    for _ in range(5):  # an unlabelled loop
        await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5})
    await until(lambda: all(got[n] for n in ("team", "oncall", "finance", "agents")))
    await until(lambda: metric(client, "webhook_dead_letters", "4") == 3)  # broken: 3 thresholds, 3 tries each
    assert got["team"] == [{"summary": "daily at 0.9", "ratio": 0.9, "source": "kvroute"}]
    assert got["oncall"] == [{"text": ":fire: daily spent (1200 tokens)"}] and tries["oncall"] == 3
    assert len(got["finance"]) == 1 and got["finance"][0]["text"].startswith(":rotating_light: kvroute alert "
                                                                          "*threshold_120*")
    assert [a["kind"] for a in got["agents"]] == ["loop_detected"]
    assert got["agents"][0]["session"].startswith("fp:") and got["agents"][0]["session_source"] == "fingerprint"
    assert tries["broken"] == 9 and not got["broken"]
    assert sorted(clock.slept) == sorted([0.5, 1.0] * 4)  # backoff: oncall's two retries, broken's 3 x 2
    assert metric(client, "webhooks", "failed") == 3


async def test_the_single_webhook_url_still_gets_every_alert(aiohttp_server, aiohttp_client, upstream, clock):
    server, got, _ = await receiver(aiohttp_server)
    budget = {"name": "daily", "scope": "tenant", "window": "day", "limit": {"tokens": 1000}, "soft": True}
    governance = {"budgets": [budget], "session_id": {"derive": "off"},
                  "alerts": {"webhook_url": str(server.make_url("/all"))}}
    client = await make_client(aiohttp_client, upstream, governance, clock)
    for _ in range(4):
        assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
        await client.server.app[keys.GOVERNOR].drain()
    await until(lambda: len(got["all"]) == 3)
    assert [a["kind"] for a in got["all"]] == ["threshold_70", "threshold_100", "threshold_120"]


async def test_a_spike_fires_per_agent(aiohttp_client, upstream, clock):
    governance = {"alerts": {"thresholds": [10.0], "spike_by": ["agent"], "spike_factor": 2},
                  "session_id": {"derive": "off"}}
    client = await make_client(aiohttp_client, upstream, governance, clock, price={"output_per_m": 10.0})
    gov = client.server.app[keys.GOVERNOR]
    clock.now = 3600 * 500_000 + 10

    async def send(agent: str, n: int) -> None:
        for _ in range(n):
            resp = await client.post("/v1/chat/completions", json=CHAT, headers={"x-kvroute-agent": agent})
            assert resp.status == 200
            await gov.drain()

    for _ in range(3):  # three quiet hours for both agents
        await send("steady", 1)
        await send("crawler", 1)
        clock.advance(3600)
    await send("steady", 1)
    for _ in range(3):  # the crawler triples its spend within the hour
        clock.advance(61)
        await send("crawler", 1)
    spikes = [a for a in gov.alerts.fired if a["kind"] == "spend_spike"]
    assert [(a["by"], a["agent"]) for a in spikes] == [("agent", "crawler")]


async def test_the_budget_gauge_has_bounded_budget_and_key_labels(aiohttp_client, upstream, clock):
    budget = {"name": "agents", "scope": "agent", "window": "day", "limit": {"tokens": 10000}}
    governance = {"budgets": [budget], "tag_values": {"agent": ["research"]}, "session_id": {"derive": "off"}}
    client = await make_client(aiohttp_client, upstream, governance, clock)
    for agent in ("research", "x1", "x2"):
        assert (await client.post("/v1/chat/completions", json=CHAT, headers={"x-kvroute-agent": agent})).status \
            == 200
    await client.server.app[keys.GOVERNOR].drain()
    text = (await (await client.get("/metrics")).read()).decode()
    assert 'kvroute_budget_used_ratio{budget="agents",key="research"} 0.03' in text
    assert 'kvroute_budget_used_ratio{budget="agents",key="other"} 0.03' in text
    assert 'key="x1"' not in text and 'key="x2"' not in text


async def test_without_a_tokenizer_the_safety_factor_keeps_fifty_concurrent_requests_within_the_budget(
        aiohttp_client, upstream, clock):
    """The worker counts 20% more prompt tokens than the chars / 4 estimate. With
    estimate_factor 1 the budget ends over its limit; with the default 1.25 it holds."""
    limit = 3000

    async def run(factor: float) -> int:
        governance = {"budgets": [{"name": "team", "scope": "global", "window": "day", "limit": {"tokens": limit}}],
                      "session_id": {"derive": "off"}, "estimate_factor": factor}
        client = await make_client(aiohttp_client, upstream, governance, clock)
        route = client.server.app[keys.ROUTES].get("tiny").tiers[0]
        text = "a fairly long prompt that the estimate undercounts " * 4
        body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 20,
                "fake_completion_tokens": 20, "fake_honor_max_tokens": True}
        estimate = route.prefixer.keys_sync(body, 16).prompt_tokens
        body["fake_prompt_tokens"] = round(estimate * 1.2)
        await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(50)))
        gov = client.server.app[keys.GOVERNOR]
        await gov.drain()
        return next(iter(gov.store._states.values())).used_t  # type: ignore[attr-defined]

    over = await run(1.0)
    held = await run(1.25)
    assert over > limit  # the overshoot the factor exists for
    # never over; short of it by what the reservations held back (a factor's worth per request)
    assert 0.9 * limit <= held <= limit
