"""docs/playbook-runaway-spend.md: every ```yaml block loads with the real config loader, and
its named limits ($2 research agent, $0.20 summariser) hold against the fake worker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from tests.clock import FakeClock
from tests.governance.conftest import worker_url

DOC = Path(__file__).resolve().parents[2] / "docs" / "playbook-runaway-spend.md"
BLOCKS = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)]
ENV = {"ACME_KEY": "sk-acme-doc", "ADMIN_KEY": "sk-admin-doc"} | {
    name: f"https://hooks.example/{name.lower()}"
    for name in ("TEAM_SLACK_WEBHOOK", "ONCALL_WEBHOOK", "FINANCE_WEBHOOK", "AGENTS_SLACK_WEBHOOK")}


def load(block: dict, workers: list[str], price: dict | None = None):
    model = {"name": "tiny", "tiers": [{"name": "small", "workers": workers},
                                       {"name": "large", "workers": workers, "price": price or {}}]}
    return config_from_dict({"models": [model], "health": {"interval_s": 60}, **block})


@pytest.fixture(autouse=True)
def env(monkeypatch):
    for k, value in ENV.items():
        monkeypatch.setenv(k, value)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_every_yaml_block_is_a_valid_config(index):
    cfg = load(BLOCKS[index], ["http://127.0.0.1:1"])
    assert cfg.governance is not None


def test_the_doc_has_the_blocks_it_talks_about():
    assert len(BLOCKS) >= 7
    alerts = next(b["governance"]["alerts"] for b in BLOCKS if "alerts" in b["governance"])
    assert [w["kinds"] for w in alerts["webhooks"]] == [["threshold_70"], ["threshold_100", "spend_spike"],
                                                       ["threshold_120"], ["loop_detected"]]


async def test_the_research_and_summariser_limits_hold(aiohttp_client, upstream, redis_url, prefix):
    block = BLOCKS[0]
    block["governance"]["redis"] = {"url": redis_url, "prefix": prefix}
    cfg = load(block, [worker_url(upstream)], price={"output_per_m": 100.0})  # $0.0001 per completion token
    client = await aiohttp_client(create_app(cfg, clock=FakeClock()))
    gov = client.server.app[keys.GOVERNOR]
    spent = {}
    for agent, limit in (("research", 2.0), ("summariser", 0.2), ("writer", 10.0)):
        statuses = []
        for i in range(30):  # $0.10 a request
            body = {"model": "tiny", "max_tokens": 1000, "fake_completion_tokens": 1000, "fake_prompt_tokens": 5,
                    "fake_honor_max_tokens": True, "messages": [{"role": "user", "content": f"doc {i}"}]}
            headers = {"Authorization": f"Bearer {ENV['ACME_KEY']}", "x-kvroute-agent": agent,
                       "x-kvroute-session": f"{agent}-{i}", "x-kvroute-tier": "large"}
            resp = await client.post("/v1/chat/completions", json=body, headers=headers)
            statuses.append(resp.status)
            await gov.drain()
            if resp.status == 429:
                assert (await resp.json())["error"]["param"] == f"{agent}-day"
                break
        spent[agent] = statuses.count(200)
        if agent != "writer":
            assert statuses[-1] == 429
        assert spent[agent] * 0.1 <= limit + 1e-9
    assert spent == {"research": 20, "summariser": 2, "writer": 30}
