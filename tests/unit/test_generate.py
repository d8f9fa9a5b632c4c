"""vLLM's token-in API (``/inference/v1/generate``) and the renders that feed it, through the
router against the fake worker: a generate request keyed by its token ids, its tokens
counted and budgeted from ``sampling_params``, its stream's usage read; a render answered
without a prefill, under the model name the client used; bad input a 400 that names the
field. ``tests/integration/test_generate_fleet.py`` runs them on a real vLLM worker."""

from __future__ import annotations

import orjson
import pytest

from kvroute.benchmarks.backends.mock import SEEN
from kvroute.router.app import create_app
from kvroute.router.requests import (
    CHAT,
    CHAT_RENDER,
    COMPLETION_RENDER,
    GENERATE,
    MESSAGES_RENDER,
    RESPONSES_RENDER,
    parse_request,
)
from tests.clock import FakeClock
from tests.governance.conftest import worker_url
from tests.unit.apis import config, counter, refused

IDS = list(range(100, 400))
CHAT_MESSAGES = [{"role": "user", "content": "What is a KV cache?"}]


def parsed(kind: str, **body):
    return parse_request(kind, orjson.dumps({"model": "m", **body}), {})


def test_what_the_router_reads_of_a_generate_request():
    req = parsed(GENERATE, token_ids=IDS, sampling_params={"max_tokens": 7, "temperature": 0})
    assert req.prompt_view == {"prompt": IDS} and req.max_tokens == 7 and req.path == "/inference/v1/generate"
    shrunk = req.with_max_tokens(3)  # a budget's cut lands where vLLM reads it
    assert shrunk.body["sampling_params"] == {"max_tokens": 3, "temperature": 0} and shrunk.max_tokens == 3
    assert req.body["sampling_params"]["max_tokens"] == 7  # the request itself is left as it was
    assert parsed(GENERATE, token_ids=IDS, sampling_params={}).max_tokens is None


def test_a_render_is_read_as_the_request_it_renders_and_generates_nothing():
    chat = parsed(CHAT, messages=CHAT_MESSAGES, max_tokens=5, stream=True)
    render = parsed(CHAT_RENDER, messages=CHAT_MESSAGES, max_tokens=5, stream=True)
    assert render.prompt_view == chat.prompt_view and render.max_tokens == 0
    assert not render.stream and render.body["stream"] is True  # the stream is the rendered request's
    assert parsed(COMPLETION_RENDER, prompt=["a", "b"]).prompt_view["prompt"] == ["a", "b"]
    assert parsed(MESSAGES_RENDER, messages=CHAT_MESSAGES, max_tokens=5).prompt_view["messages"]
    assert parsed(RESPONSES_RENDER, input="hi").prompt_view["messages"] == [{"role": "user", "content": "hi"}]
    assert parsed(RESPONSES_RENDER, input="hi", previous_response_id="resp_1").continues_stored


async def test_a_generate_request_is_routed_by_its_token_ids_and_counted(aiohttp_client, upstream):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    ask = {"model": "tiny", "token_ids": IDS, "sampling_params": {"max_tokens": 3}}
    first = await client.post("/inference/v1/generate", json=ask)
    assert first.status == 200 and first.headers["x-kvroute-predicted-cached-tokens"] == "0"
    assert upstream.app[SEEN][-1] == {**ask, "model": "tiny-up"}
    again = await client.post("/inference/v1/generate", json={**ask, "token_ids": IDS + [7, 8, 9]})
    assert int(again.headers["x-kvroute-predicted-cached-tokens"]) > 0  # the same ids, one more question
    page = (await (await client.get("/metrics")).read()).decode()
    assert (await first.json())["usage"]["prompt_tokens"] == len(IDS)  # the worker's counts, as it gave them
    assert counter(page, "kvroute_worker_prompt_tokens_total") == 2 * len(IDS) + 3
    assert counter(page, "kvroute_worker_completion_tokens_total") == 2 * 3


@pytest.mark.parametrize("asked", [False, True])
async def test_a_generate_stream_carries_its_usage_to_the_router(aiohttp_client, upstream, asked):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    ask = {"model": "tiny", "token_ids": IDS, "sampling_params": {"max_tokens": 3}, "stream": True,
           **({"stream_options": {"include_usage": True}} if asked else {})}
    resp = await client.post("/inference/v1/generate", json=ask)
    events = [e for e in (await resp.read()).split(b"\n\n") if e.startswith(b"data: {")]
    assert upstream.app[SEEN][-1]["stream_options"] == {"include_usage": True}  # always asked of the worker
    assert any(b'"usage":{' in e for e in events) == asked  # and passed on only when the client asked
    page = (await (await client.get("/metrics")).read()).decode()
    assert counter(page, "kvroute_worker_completion_tokens_total") == 3


async def test_a_budget_reserves_and_cuts_a_generate_requests_max_tokens(aiohttp_client, upstream):
    governance = {"budgets": [{"name": "req", "scope": "request", "limit": {"tokens": 1000}}]}
    client = await aiohttp_client(create_app(config(worker_url(upstream), governance=governance), clock=FakeClock()))
    resp = await client.post("/inference/v1/generate", json={"model": "tiny", "token_ids": IDS,
                                                             "sampling_params": {"max_tokens": 5000}})
    assert resp.status == 200
    max_tokens = upstream.app[SEEN][-1]["sampling_params"]["max_tokens"]
    assert 0 < max_tokens < 1000  # cut to what the budget leaves after the prompt


@pytest.mark.parametrize("path, body, many", [
    ("/v1/chat/completions/render", {"messages": CHAT_MESSAGES, "max_tokens": 4, "stream": True}, False),
    ("/v1/completions/render", {"prompt": ["one", "two"], "max_tokens": 4}, True),
    ("/v1/messages/render", {"messages": CHAT_MESSAGES, "max_tokens": 4}, False),
    ("/v1/responses/render", {"input": "hi"}, False),
    ("/cohere/v2/chat/render", {"messages": CHAT_MESSAGES, "max_tokens": 4}, False),
])
async def test_a_render_comes_back_under_the_clients_model_name(aiohttp_client, upstream, path, body, many):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    resp = await client.post(path, json={"model": "tiny", **body})
    assert resp.status == 200 and resp.content_type == "application/json"
    assert upstream.app[SEEN][-1] == {"model": "tiny-up", **body, "path": path}  # the worker's own name
    rendered = await resp.json()
    assert isinstance(rendered, list) == many
    for item in rendered if many else [rendered]:
        assert item["model"] == "tiny"  # so it goes back through this router as it is
    first = rendered[0] if many else rendered
    again = await client.post("/inference/v1/generate", json=first)
    assert again.status == 200 and await again.read()
    page = (await (await client.get("/metrics")).read()).decode()
    generated = first["sampling_params"]["max_tokens"]
    assert counter(page, "kvroute_worker_completion_tokens_total") == generated  # the generate's; a render has none


@pytest.mark.parametrize("path, body, param", [
    ("/inference/v1/generate", {"sampling_params": {}}, "token_ids"),
    ("/inference/v1/generate", {"token_ids": [], "sampling_params": {}}, "token_ids"),
    ("/inference/v1/generate", {"token_ids": [1, -2], "sampling_params": {}}, "token_ids"),
    ("/inference/v1/generate", {"token_ids": [1, True], "sampling_params": {}}, "token_ids"),
    ("/inference/v1/generate", {"token_ids": "1 2", "sampling_params": {}}, "token_ids"),
    ("/inference/v1/generate", {"token_ids": [1]}, "sampling_params"),
    ("/inference/v1/generate", {"token_ids": [1], "sampling_params": [16]}, "sampling_params"),
    ("/inference/v1/generate", {"token_ids": [1], "sampling_params": {"max_tokens": 0}}, "sampling_params.max_tokens"),
    ("/inference/v1/generate", {"token_ids": [1], "sampling_params": {"n": "2"}}, "sampling_params.n"),
    ("/inference/v1/generate", {"token_ids": [1], "sampling_params": {}, "stream": "yes"}, "stream"),
    ("/inference/v1/generate", {"token_ids": [1], "sampling_params": {}, "cache_salt": ""}, "cache_salt"),
    ("/v1/chat/completions/render", {"messages": []}, "messages"),
    ("/v1/completions/render", {}, "prompt"),
    ("/v1/messages/render", {"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
])
async def test_bad_input_is_a_400_that_names_the_field(aiohttp_client, upstream, path, body, param):
    err = await refused(aiohttp_client, upstream, path, body)
    assert err["param"] == param, err


async def test_a_worker_that_renders_junk_is_a_clean_502(aiohttp_client, aiohttp_server):
    from aiohttp import web

    from kvroute.benchmarks.backends.mock import bare_worker

    async def junk(request: web.Request) -> web.Response:
        return web.json_response(["not a request"])

    async def chat(request: web.Request) -> web.Response:
        return web.json_response({})

    worker = await aiohttp_server(bare_worker(chat, ("POST", "/v1/completions/render", junk)))
    client = await aiohttp_client(create_app(config(str(worker.make_url("")).rstrip("/"))))
    resp = await client.post("/v1/completions/render", json={"model": "tiny", "prompt": "x"})
    assert resp.status == 502 and "render" in (await resp.json())["error"]["message"]
