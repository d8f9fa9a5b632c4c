"""vLLM's ``/rerank`` and ``/score`` (and their ``/v1/`` and ``/v2/`` paths) through the
router against the fake worker: sent on to the worker's own path, routed by the query,
every text counted, nothing generated, bad input a 400 that names the field."""

from __future__ import annotations

import orjson
import pytest

from kvroute.benchmarks.backends.mock import SEEN
from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.requests import RERANK, SCORE, parse_request
from tests.clock import FakeClock
from tests.governance.conftest import worker_url
from tests.unit.apis import config, counter

QUERY = "Which worker holds the prefix of this prompt? " * 20
RERANK_ASK = {"model": "tiny", "query": QUERY, "documents": ["the first worker", "the second", "neither"], "top_n": 2}


@pytest.mark.parametrize("path, upstream_path", [("/rerank", "/rerank"), ("/v1/rerank", "/rerank"),
                                                 ("/v2/rerank", "/rerank")])
async def test_a_rerank_is_sent_to_the_workers_own_path(aiohttp_client, upstream, path, upstream_path):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    resp = await client.post(path, json=RERANK_ASK)
    body = await resp.json()
    assert resp.status == 200 and len(body["results"]) == 2
    assert upstream.app[SEEN][-1] == {**RERANK_ASK, "model": "tiny-up", "path": upstream_path}


async def test_a_score_is_passed_through_and_counted(aiohttp_client, upstream):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    ask = {"model": "tiny", "text_1": QUERY, "text_2": ["a", "b"]}
    for path in ("/score", "/v1/score"):
        resp = await client.post(path, json=ask)
        assert resp.status == 200 and [d["index"] for d in (await resp.json())["data"]] == [0, 1]
        assert upstream.app[SEEN][-1]["path"] == "/score"
    second = await client.post("/score", json={**ask, "text_2": "c"})  # the same query: its blocks are known
    assert int(second.headers["x-kvroute-predicted-cached-tokens"]) > 0
    page = (await (await client.get("/metrics")).read()).decode()
    assert counter(page, "kvroute_worker_completion_tokens_total") == 0
    assert counter(page, "kvroute_worker_prompt_tokens_total") > 3 * len(QUERY) // 4


def test_the_query_routes_and_every_text_counts():
    texts = parse_request(RERANK, orjson.dumps(RERANK_ASK), {}).prompt_view["prompt"]
    assert texts == [QUERY, "the first worker", "the second", "neither"]
    for sides in ({"data_1": "q", "data_2": ["a"]}, {"queries": ["q"], "documents": "a"},
                  {"queries": "q", "items": ["a", {"content": []}]}):
        req = parse_request(SCORE, orjson.dumps({"model": "m", **sides}), {})
        assert req.prompt_view["prompt"] == ["q", "a"] and req.max_tokens == 0


async def test_budgets_reserve_no_completion_for_a_rerank(aiohttp_client, upstream):
    governance = {"budgets": [{"name": "day", "scope": "global", "window": "day", "limit": {"tokens": 100000}}],
                  "default_max_tokens": 5000}
    client = await aiohttp_client(create_app(config(worker_url(upstream), governance=governance), clock=FakeClock()))
    resp = await client.post("/rerank", json=RERANK_ASK)
    assert resp.status == 200 and "max_tokens" not in upstream.app[SEEN][-1]
    gov = client.server.app[keys.GOVERNOR]
    await gov.drain()
    state = next(s for k, s in gov.store._states.items() if k.startswith("day:"))
    assert state.used_t == (await resp.json())["usage"]["total_tokens"] and state.res_t == 0


@pytest.mark.parametrize("path, body, param", [
    ("/rerank", {"model": "tiny", "documents": ["a"]}, "query"),
    ("/rerank", {"model": "tiny", "query": 5, "documents": ["a"]}, "query"),
    ("/rerank", {"model": "tiny", "query": "q"}, "documents"),
    ("/rerank", {"model": "tiny", "query": "q", "documents": []}, "documents"),
    ("/rerank", {"model": "tiny", "query": "q", "documents": [1]}, "documents"),
    ("/rerank", {"model": "tiny", "query": "q", "documents": ["a"], "top_n": -1}, "top_n"),
    ("/rerank", {"model": "tiny", "query": "q", "documents": ["a"], "stream": True}, "stream"),
    ("/score", {"model": "tiny", "text_1": "q"}, "text_1"),
    ("/score", {"model": "tiny", "queries": "q", "items": []}, "items"),
    ("/v1/score", {"model": "tiny", "text_1": None, "text_2": "a"}, "text_1"),
])
async def test_bad_scoring_requests_are_a_400_naming_the_field(aiohttp_client, upstream, path, body, param):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    resp = await client.post(path, json=body)
    assert resp.status == 400 and (await resp.json())["error"]["param"] == param
    assert (await client.get(path)).status == 405
