"""vLLM's ``/tokenize`` and ``/detokenize`` through the router against the fake worker: the
model's name rewritten, nothing prefilled (no keys, no cache, nothing charged), bad input a
400 that names the field."""

from __future__ import annotations

import pytest

from kvroute.benchmarks.backends.mock import SEEN
from kvroute.router import keys
from kvroute.router.app import create_app
from tests.clock import FakeClock
from tests.governance.conftest import worker_url
from tests.unit.apis import config

LONG = "You are the platform team's assistant. " * 40


async def test_tokenize_and_detokenize_are_passed_through(aiohttp_client, upstream):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    resp = await client.post("/tokenize", json={"model": "tiny", "prompt": "hi there"})
    assert resp.status == 200 and (await resp.json())["count"] == 8
    assert upstream.app[SEEN][-1] == {"model": "tiny-up", "prompt": "hi there", "path": "/tokenize"}
    assert resp.headers["x-kvroute-worker"] == worker_url(upstream)
    chat = await client.post("/tokenize", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status == 200 and (await chat.json())["tokens"]
    back = await client.post("/detokenize", json={"model": "tiny", "tokens": [104, 105]})
    assert back.status == 200 and await back.json() == {"prompt": "hi"}
    assert upstream.app[SEEN][-1]["path"] == "/detokenize"


async def test_a_tokenize_prefills_nothing_and_charges_nothing(aiohttp_client, upstream):
    governance = {"budgets": [{"name": "day", "scope": "global", "window": "day", "limit": {"tokens": 100000}}]}
    client = await aiohttp_client(create_app(config(worker_url(upstream), governance=governance), clock=FakeClock()))
    resp = await client.post("/tokenize", json={"model": "tiny", "prompt": LONG})
    assert resp.status == 200 and resp.headers["x-kvroute-predicted-cached-tokens"] == "0"
    assert len(client.app[keys.ROUTES].get("tiny").tiers[0].index) == 0  # no blocks recorded on the worker
    first = await client.post("/v1/completions", json={"model": "tiny", "prompt": LONG, "max_tokens": 2})
    assert first.headers["x-kvroute-predicted-cached-tokens"] == "0"
    gov = client.server.app[keys.GOVERNOR]
    await gov.drain()
    state = next(s for k, s in gov.store._states.items() if k.startswith("day:"))
    assert state.used_t == (await first.json())["usage"]["total_tokens"]  # the completion's alone


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"model": "tiny"}, "prompt"),
    ("/tokenize", {"model": "tiny", "prompt": "a", "messages": []}, "prompt"),
    ("/tokenize", {"model": "tiny", "prompt": ["a"]}, "prompt"),
    ("/tokenize", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/tokenize", {"model": "tiny", "prompt": "a", "stream": True}, "stream"),
    ("/tokenize", {"prompt": "a"}, "model"),
    ("/detokenize", {"model": "tiny"}, "tokens"),
    ("/detokenize", {"model": "tiny", "tokens": [-1]}, "tokens"),
    ("/detokenize", {"model": "tiny", "tokens": "12"}, "tokens"),
])
async def test_bad_token_requests_are_a_400_naming_the_field(aiohttp_client, upstream, path, body, param):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    resp = await client.post(path, json=body)
    assert resp.status == 400 and (await resp.json())["error"]["param"] == param
    assert (await client.get(path)).status == 405
