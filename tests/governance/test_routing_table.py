"""The routing table (``routes:``): a tier or a model per tag or model name, between the
x-kvroute-tier header and the classifier; and a downgrade budget's ``downgrade_at``."""

from __future__ import annotations

import pytest
from aiohttp import web

from kvroute.benchmarks.backends.mock import SEEN
from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from kvroute.router.errors import ConfigError
from kvroute.router.routing_table import ROUTE_RULE
from tests.governance.conftest import worker_url

ROUTES = [
    {"name": "summaries-small", "match": {"feature": "summarise"}, "tier": "small"},
    {"name": "research-large", "match": {"agent": ["research", "planner"]}, "tier": "large"},
    {"name": "legacy", "model": "gpt-4.*", "to_model": "tiny", "tier": "large"},
    {"name": "no-such-tier-here", "match": {"task": "odd"}, "tier": "xl"},
]


def config(url: str, routes: list | None = None, governance: dict | None = None) -> dict:
    raw: dict = {"models": [
        {"name": "tiny", "tiers": [{"name": "small", "workers": [url], "policy": "round_robin"},
                                   {"name": "large", "workers": [url], "policy": "round_robin",
                                    "price": {"output_per_m": 100.0}}]},
        {"name": "gpt-4o", "workers": [url], "policy": "round_robin"},
        {"name": "huge", "tiers": [{"name": "xl", "workers": [url], "policy": "round_robin"}]}],
        "health": {"interval_s": 60}, "routes": ROUTES if routes is None else routes}
    if governance is not None:
        raw["governance"] = governance
    return raw


@pytest.fixture
async def seen_rules(aiohttp_client, upstream):
    """A router with the table, and the rule names the pipeline left on each request."""
    rules: list[str | None] = []

    @web.middleware
    async def spy(request, handler):
        try:
            return await handler(request)
        finally:
            rules.append(request.get(ROUTE_RULE))

    app = create_app(config_from_dict(config(worker_url(upstream))))
    app.middlewares.append(spy)
    return await aiohttp_client(app), rules


async def send(client, model: str = "tiny", **headers) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    resp = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["model"]  # the fake worker echoes the upstream model name


async def test_table_picks_the_tier_after_the_header_and_before_the_default(seen_rules):
    client, rules = seen_rules
    assert await send(client) == "small"  # no rule, no classifier: the first tier
    assert await send(client, **{"x-kvroute-agent": "planner"}) == "large"
    assert await send(client, **{"x-kvroute-feature": "summarise", "x-kvroute-agent": "research"}) == "small"
    # the header wins over the table
    assert await send(client, **{"x-kvroute-agent": "research", "x-kvroute-tier": "small"}) == "small"
    # a regex on the model name sends it to another model's tier
    assert await send(client, "gpt-4o") == "large"
    # a rule whose tier the model lacks is skipped
    assert await send(client, **{"x-kvroute-task": "odd"}) == "small"
    assert rules == [None, "research-large", "summaries-small", None, "legacy", None]


async def test_table_errors_name_the_key(upstream):
    url = worker_url(upstream)
    cases = [([{"name": "x", "tier": "nope"}], r"routes\[0\].tier"),
             ([{"name": "x", "to_model": "ghost"}], r"routes\[0\].to_model"),
             ([{"name": "x", "model": "(", "tier": "small"}], r"routes\[0\].model"),
             ([{"name": "x", "match": {"colour": "red"}, "tier": "small"}], r"routes\[0\].match.colour"),
             ([{"name": "x"}], r"routes\[0\]': give tier"),
             ([{"name": "x", "tier": "small"}, {"name": "x", "tier": "large"}], r"routes\[1\].name")]
    for routes, where in cases:
        with pytest.raises(ConfigError, match=where):
            config_from_dict(config(url, routes))


async def test_downgrade_at_moves_to_the_cheaper_tier_at_a_share_of_the_budget(aiohttp_client, upstream):
    budget = {"name": "large-money", "scope": "global", "window": "day", "limit": {"usd": 0.01},
              "action": "downgrade", "downgrade_at": 0.8}
    cfg = config_from_dict(config(worker_url(upstream), routes=[], governance={"budgets": [budget]}))
    client = await aiohttp_client(create_app(cfg))
    gov = client.server.app[keys.GOVERNOR]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30,
            "fake_completion_tokens": 30, "fake_honor_max_tokens": True}
    tiers = []
    for i in range(4):  # $0.003 each on the large tier: 30%, 60%, 90% used before the 4th
        resp = await client.post("/v1/chat/completions", json={**body, "user": f"u{i}"},
                                 headers={"x-kvroute-tier": "large"})
        assert resp.status == 200
        tiers.append(upstream.app[SEEN][-1]["model"])
        await gov.drain()
    assert tiers == ["large", "large", "large", "small"]  # 90% >= 80%: downgraded while room was left
    state = gov.store.state("large-money:*:86400/24")
    assert state.res_t == 0 and abs(state.used_usd - 0.009) < 1e-9  # the large reservation was given back
    with pytest.raises(ConfigError, match=r"budgets\[0\].downgrade_at"):
        config_from_dict(config(worker_url(upstream), routes=[],
                                governance={"budgets": [{**budget, "action": "reject"}]}))
