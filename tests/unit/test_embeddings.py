"""``/v1/embeddings`` through the router against the fake worker: routing, bad input,
governance (no completion tokens reserved), the response cache, loops and telemetry."""

from __future__ import annotations

import orjson
import pytest

from kvroute.benchmarks.backends.mock import SEEN
from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.governance.loops import signature
from kvroute.router.requests import EMBEDDING, parse_request
from tests.clock import FakeClock
from tests.governance.conftest import worker_url
from tests.unit import apis

EMBED = {"model": "embed", "input": ["a first passage", "a second one"]}


def config(worker, **top):
    return apis.config(worker, name="embed", upstream_model="tiny-embed", **top)


async def test_an_embeddings_request_reaches_the_worker_s_embeddings_route(aiohttp_client, upstream):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    resp = await client.post("/v1/embeddings", json=EMBED)
    assert resp.status == 200
    body = await resp.json()
    assert [d["index"] for d in body["data"]] == [0, 1] and body["usage"]["completion_tokens"] == 0
    assert resp.headers["x-kvroute-worker"] == worker_url(upstream)
    sent = upstream.app[SEEN][-1]
    assert sent == {**EMBED, "model": "tiny-embed", "path": "/v1/embeddings"}  # nothing added, no stream_options
    metrics = (await (await client.get("/metrics")).read()).decode()
    tokens = body["usage"]["prompt_tokens"]
    assert f'kvroute_worker_prompt_tokens_total{{model="embed",worker="{worker_url(upstream)}"}} {tokens}.0' \
        in metrics
    assert f'kvroute_worker_completion_tokens_total{{model="embed",worker="{worker_url(upstream)}"}} 0.0' in metrics
    assert (await client.get("/v1/embeddings")).status == 405


@pytest.mark.parametrize("body, param", [
    ({"model": "embed"}, "input"),
    ({"model": "embed", "input": ""}, "input"),
    ({"model": "embed", "input": []}, "input"),
    ({"model": "embed", "input": ["ok", ""]}, "input"),
    ({"model": "embed", "input": ["text", 3]}, "input"),
    ({"model": "embed", "input": [[]]}, "input"),
    ({"model": "embed", "input": [True, 2]}, "input"),
    ({"model": "embed", "input": {"text": "x"}}, "input"),
    ({"model": "embed", "input": "x", "stream": True}, "stream"),
    ({"model": "embed", "input": "x", "stream": "no"}, "stream"),
    ({"model": "embed", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"model": "embed", "input": "x", "dimensions": 0}, "dimensions"),
    ({"model": "embed", "input": "x", "dimensions": "8"}, "dimensions"),
    ({"input": "x"}, "model"),
])
async def test_bad_embeddings_input_is_a_400_that_names_the_field(aiohttp_client, upstream, body, param):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    resp = await client.post("/v1/embeddings", json=body)
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert not upstream.app[SEEN]


def test_every_accepted_input_shape_parses():
    for value in ("one", ["one", "two"], [1, 2, 3], [[1, 2], [3]]):
        req = parse_request(EMBEDDING, orjson.dumps({"model": "m", "input": value}), {})
        assert req.path == "/v1/embeddings" and not req.stream and req.max_tokens == 0


async def test_a_budget_reserves_no_completion_tokens_for_embeddings(aiohttp_client, upstream):
    # a chat needs room for min_completion_tokens within the request budget; an embedding
    # generates nothing, so its prompt alone must fit
    governance = {"budgets": [{"name": "per-call", "scope": "request", "limit": {"tokens": 40}},
                              {"name": "day", "scope": "global", "window": "day", "limit": {"tokens": 100000}}],
                  "estimate_factor": 1, "min_completion_tokens": 64}
    client = await aiohttp_client(create_app(config(worker_url(upstream), governance=governance), clock=FakeClock()))
    resp = await client.post("/v1/embeddings", json=EMBED)
    assert resp.status == 200, await resp.text()
    prompt = (await resp.json())["usage"]["prompt_tokens"]
    assert "max_tokens" not in upstream.app[SEEN][-1]
    chat = {"model": "embed", "messages": [{"role": "user", "content": "hi"}]}
    assert (await client.post("/v1/chat/completions", json=chat)).status == 429
    gov = client.server.app[keys.GOVERNOR]
    await gov.drain()
    state = next(s for k, s in gov.store._states.items() if k.startswith("day:"))
    assert state.used_t == prompt and state.res_t == 0


async def test_a_batch_counts_every_input_s_tokens_for_load_and_budgets(aiohttp_client, upstream):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    route = client.server.app[keys.ROUTES].get("embed").tiers[0]
    one = parse_request(EMBEDDING, b'{"model": "embed", "input": ["' + b"x" * 400 + b'"]}', {})
    three = parse_request(EMBEDDING, b'{"model": "embed", "input": ["' + b"x" * 400 + b'", "'
                          + b"y" * 400 + b'", "' + b"z" * 400 + b'"]}', {})
    ids = parse_request(EMBEDDING, b'{"model": "embed", "input": [[1, 2, 3], [4, 5, 6, 7]]}', {})
    first_ids = parse_request(EMBEDDING, b'{"model": "embed", "input": [[1, 2, 3]]}', {})
    assert (await route.context(three)).prompt_tokens == (await route.context(one)).prompt_tokens + 2 * 101
    assert (await route.context(ids)).prompt_tokens == (await route.context(first_ids)).prompt_tokens + 4


async def test_a_repeated_embeddings_request_is_answered_by_the_exact_cache(aiohttp_client, upstream):
    client = await aiohttp_client(create_app(config(worker_url(upstream), cache={"exact": True})))
    first = await client.post("/v1/embeddings", json=EMBED)
    again = await client.post("/v1/embeddings", json=EMBED)
    other = await client.post("/v1/embeddings", json={**EMBED, "input": "something else"})
    assert first.headers["x-kvroute-cache"] == "miss" and again.headers["x-kvroute-cache"] == "hit"
    assert other.headers["x-kvroute-cache"] == "miss"
    hit = await again.json()
    assert hit["data"] == (await first.json())["data"]
    assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] == hit["usage"]["prompt_tokens"]
    assert len(upstream.app[SEEN]) == 2


async def test_a_shared_prefix_is_predicted_cached_on_the_worker_that_embedded_it(aiohttp_client, upstream):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    instruction = "Represent this passage for retrieving related documents: " * 8
    first = await client.post("/v1/embeddings", json={"model": "embed", "input": instruction + "alpha"})
    second = await client.post("/v1/embeddings", json={"model": "embed", "input": instruction + "beta"})
    assert first.headers["x-kvroute-predicted-cached-tokens"] == "0"
    assert int(second.headers["x-kvroute-predicted-cached-tokens"]) > 0


def test_loop_detection_tells_embedding_inputs_apart():
    def sig(value) -> str:
        return signature(parse_request(EMBEDDING, orjson.dumps({"model": "m", "input": value}), {}).prompt_view)

    assert sig("first") != sig("second")
    assert sig(["a", "b"]) == sig(["a", "b"]) != sig(["a", "c"])
