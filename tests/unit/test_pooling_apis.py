"""vLLM's ``/classify`` and ``/pooling``, and embeddings of a conversation, through the
router against the fake worker: sent to the worker's own path under its model name, routed
by the prompt (a conversation keyed as a chat), every token counted and none generated,
answered again from the cache, and bad input a 400 that names the field."""

from __future__ import annotations

import orjson
import pytest

from kvroute.benchmarks.backends.mock import SEEN
from kvroute.router.app import create_app
from kvroute.router.requests import CLASSIFY, COHERE_EMBED, EMBEDDING, POOL, parse_request
from tests.clock import FakeClock
from tests.governance.conftest import worker_url
from tests.unit.apis import config, counter, refused

SYSTEM = "You sort support tickets by urgency. " * 40
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "the router is down"}]


@pytest.mark.parametrize("path", ["/classify", "/pooling"])
async def test_a_request_reaches_the_workers_own_path_and_is_counted(aiohttp_client, upstream, path):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    ask = {"model": "tiny", "input": [SYSTEM + "one", SYSTEM + "two"]}
    resp = await client.post(path, json=ask)
    body = await resp.json()
    assert resp.status == 200 and [d["index"] for d in body["data"]] == [0, 1]
    assert upstream.app[SEEN][-1] == {**ask, "model": "tiny-up", "path": path}
    page = (await (await client.get("/metrics")).read()).decode()
    assert counter(page, "kvroute_worker_completion_tokens_total") == 0
    assert counter(page, "kvroute_worker_prompt_tokens_total") == body["usage"]["prompt_tokens"]


@pytest.mark.parametrize("path", ["/classify", "/pooling", "/v1/embeddings"])
async def test_a_conversation_is_keyed_as_a_chat(aiohttp_client, upstream, path):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    first = await client.post(path, json={"model": "tiny", "messages": CHAT})
    assert first.status == 200 and upstream.app[SEEN][-1]["messages"] == CHAT
    assert first.headers["x-kvroute-predicted-cached-tokens"] == "0"
    follow = [CHAT[0], {"role": "user", "content": "billing is wrong"}]  # the same system prompt
    second = await client.post(path, json={"model": "tiny", "messages": follow})
    assert int(second.headers["x-kvroute-predicted-cached-tokens"]) > 0


def test_what_the_router_reads_of_each_prompt_shape():
    def view(kind: str, **body):
        return parse_request(kind, orjson.dumps({"model": "m", **body}), {}).prompt_view

    assert view(CLASSIFY, input="a") == {"prompt": "a"} and view(POOL, input=[1, 2]) == {"prompt": [1, 2]}
    # vLLM's pooling APIs render a conversation without a generation prompt unless asked for one
    assert view(CLASSIFY, messages=CHAT) == {"messages": CHAT, "add_generation_prompt": False}
    assert view(POOL, messages=CHAT, add_generation_prompt=True, chat_template_kwargs={"a": 1}) == {
        "messages": CHAT, "add_generation_prompt": True, "chat_template_kwargs": {"a": 1}}
    # vLLM reads a conversation in 'input' too
    assert view(EMBEDDING, input=CHAT) == {"messages": CHAT, "add_generation_prompt": False}
    batch = view(EMBEDDING, messages=[CHAT, CHAT[1:]])  # a batch: every conversation's text counts
    assert batch["prompt"][1] == "user: the router is down\n" and SYSTEM in batch["prompt"][0]
    assert view(EMBEDDING, input=[CHAT[1:], CHAT[1:]])["prompt"] == ["user: the router is down\n"] * 2
    for kind in (CLASSIFY, POOL, EMBEDDING):
        assert parse_request(kind, orjson.dumps({"model": "m", "input": "x"}), {}).max_tokens == 0


async def test_embeddings_of_a_batch_of_conversations_count_every_one(aiohttp_client, upstream):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    resp = await client.post("/v1/embeddings", json={"model": "tiny", "input": [CHAT, CHAT[1:]]})
    assert resp.status == 200 and len((await resp.json())["data"]) == 2
    assert upstream.app[SEEN][-1]["input"] == [CHAT, CHAT[1:]]


@pytest.mark.parametrize("path, body, param", [
    ("/classify", {}, "input"),
    ("/classify", {"input": "x", "messages": CHAT}, "input"),
    ("/classify", {"input": ""}, "input"),
    ("/classify", {"input": CHAT}, "input"),  # a conversation goes in 'messages' here
    ("/classify", {"messages": [CHAT]}, "messages[0]"),  # one conversation, not a batch
    ("/pooling", {"messages": []}, "messages"),
    ("/pooling", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/pooling", {"input": "x", "stream": True}, "stream"),
    ("/v1/embeddings", {"messages": [CHAT, [{"role": "user", "content": 3}]]}, "messages[1][0].content"),
    ("/v1/embeddings", {"input": [CHAT[0], "text"]}, "input"),
])
async def test_bad_input_is_a_400_that_names_the_field(aiohttp_client, upstream, path, body, param):
    err = await refused(aiohttp_client, upstream, path, body)
    assert err["param"] == param, err


@pytest.mark.parametrize("path", ["/classify", "/pooling"])
async def test_a_repeat_is_answered_by_the_exact_cache(aiohttp_client, upstream, path):
    client = await aiohttp_client(create_app(config(worker_url(upstream), cache={"exact": True})))
    ask = {"model": "tiny", "input": "is this urgent?"}
    first, again = [await client.post(path, json=ask) for _ in range(2)]
    assert first.headers["x-kvroute-cache"] == "miss" and again.headers["x-kvroute-cache"] == "hit"
    assert (await again.json())["data"] == (await first.json())["data"] and len(upstream.app[SEEN]) == 1


async def test_budgets_reserve_no_completion_tokens(aiohttp_client, upstream):
    governance = {"budgets": [{"name": "day", "scope": "global", "window": "day", "limit": {"tokens": 100}}],
                  "default_max_tokens": 5000}
    client = await aiohttp_client(create_app(config(worker_url(upstream), governance=governance), clock=FakeClock()))
    resp = await client.post("/classify", json={"model": "tiny", "input": "short"})
    assert resp.status == 200  # 5,000 completion tokens reserved would have broken the 100-token budget


async def test_cohere_embed_is_routed_by_its_texts_and_its_billed_tokens_counted(aiohttp_client, upstream):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    ask = {"model": "tiny", "texts": [SYSTEM + "one", SYSTEM + "two"], "input_type": "search_document",
           "embedding_types": ["float"]}
    first = await client.post("/v2/embed", json=ask)
    body = await first.json()
    assert first.status == 200 and len(body["embeddings"]["float"]) == 2
    assert upstream.app[SEEN][-1] == {**ask, "model": "tiny-up", "path": "/v2/embed"}
    again = await client.post("/v2/embed", json={**ask, "texts": [SYSTEM + "three"]})
    assert int(again.headers["x-kvroute-predicted-cached-tokens"]) > 0  # the same opening
    page = (await (await client.get("/metrics")).read()).decode()
    billed = body["meta"]["billed_units"]["input_tokens"] + (await again.json())["meta"]["billed_units"]["input_tokens"]
    assert counter(page, "kvroute_worker_prompt_tokens_total") == billed
    assert counter(page, "kvroute_worker_completion_tokens_total") == 0


def test_what_the_router_reads_of_a_cohere_embed_request():
    def view(**body):
        return parse_request(COHERE_EMBED, orjson.dumps({"model": "m", **body}), {}).prompt_view

    assert view(texts=["a", "b"]) == {"prompt": ["a", "b"]}
    # vLLM cuts at max_tokens unless truncate is NONE: START keeps the last tokens, END the first
    assert view(texts=["a"], max_tokens=8, truncate="START") == {
        "prompt": ["a"], "truncate_prompt_tokens": 8, "truncation_side": "left"}
    assert view(texts=["a"], max_tokens=8)["truncation_side"] == "right"
    assert "truncate_prompt_tokens" not in view(texts=["a"], max_tokens=8, truncate="NONE")
    inputs = [{"content": [{"type": "text", "text": "a photo of "}, {"type": "image_url", "image_url": {"url": "x"}},
                           {"type": "text", "text": "a router"}]}]
    assert view(inputs=inputs) == {"prompt": ["a photo of a router"]} and view(images=["data:x"]) == {"prompt": [""]}
    req = parse_request(COHERE_EMBED, orjson.dumps({"model": "m", "texts": ["a"], "max_tokens": 8}), {})
    assert req.max_tokens == 0  # max_tokens cuts the input here: nothing is generated


@pytest.mark.parametrize("body, param", [
    ({}, "texts"),
    ({"texts": ["a"], "images": ["x"]}, "texts"),
    ({"texts": []}, "texts"),
    ({"texts": ["a", 3]}, "texts"),
    ({"inputs": [{"content": "a"}]}, "inputs"),
    ({"images": [{"url": "x"}]}, "images"),
    ({"texts": ["a"], "truncate": "MIDDLE"}, "truncate"),
    ({"texts": ["a"], "max_tokens": 0}, "max_tokens"),
    ({"texts": ["a"], "stream": True}, "stream"),
])
async def test_a_bad_cohere_embed_request_is_a_400_that_names_the_field(aiohttp_client, upstream, body, param):
    err = await refused(aiohttp_client, upstream, "/v2/embed", body)
    assert err["param"] == param, err
