"""``/v1/messages`` (Anthropic's Messages API, which vLLM serves) through the router against
the fake worker: the prompt read as chat messages, usage under its own names, the caller's
``x-api-key``, errors Anthropic's clients read, governance's stream meter."""

from __future__ import annotations

import orjson
import pytest

from kvroute.benchmarks.backends.mock import SEEN
from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.requests import MESSAGES, parse_request
from tests.clock import FakeClock
from tests.governance.conftest import worker_url
from tests.unit.apis import config, counter

ASK = {"model": "tiny", "max_tokens": 50, "system": "answer briefly",
       "messages": [{"role": "user", "content": "what is a KV cache?"}]}


async def test_a_messages_request_is_passed_through_and_its_usage_counted(aiohttp_client, upstream):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    resp = await client.post("/v1/messages", json=ASK)
    assert resp.status == 200
    body = await resp.json()
    assert body["type"] == "message" and body["content"][0]["text"] == "word word word"
    assert upstream.app[SEEN][-1] == {**ASK, "model": "tiny-up", "path": "/v1/messages"}
    stream = await client.post("/v1/messages", json={**ASK, "stream": True})
    events = [e.split("\n", 1)[0] for e in (await stream.read()).decode().split("\n\n") if e]
    assert events == ["event: message_start", "event: content_block_start", *["event: content_block_delta"] * 3,
                      "event: content_block_stop", "event: message_delta", "event: message_stop"]
    assert "stream_options" not in upstream.app[SEEN][-1]
    metrics = (await (await client.get("/metrics")).read()).decode()
    # input_tokens leave out the cache's reads: the prompt is 12 + 8 tokens, 8 of them cached
    assert counter(metrics, "kvroute_worker_prompt_tokens_total") == 40
    assert counter(metrics, "kvroute_worker_cached_prompt_tokens_total") == 16
    assert counter(metrics, "kvroute_worker_completion_tokens_total") == 6


def test_the_prompt_is_read_as_the_chat_messages_vllm_renders():
    """As vllm/entrypoints/anthropic/serving.py converts it (test_chat_template_fleet.py holds
    the rendering to a real worker's count)."""
    parts = [{"type": "text", "text": "find "}, {"type": "text", "text": "it"}]
    body = {"model": "m", "max_tokens": 5, "system": [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=3f2a;"},  # dropped, as vLLM does
        {"type": "text", "text": "be brief"}, {"type": "text", "text": " and kind"}], "messages": [
        {"role": "user", "content": parts},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "look it up"},
                                          {"type": "tool_use", "id": "t1", "name": "search", "input": {"q": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "text", "text": "nothing"}, {"type": "text", "text": "at all"}]}]},
    ], "tools": [{"name": "search", "description": "look", "input_schema": {"type": "object"}}]}
    view = parse_request(MESSAGES, orjson.dumps(body), {}).prompt_view
    assert view["messages"] == [
        {"role": "system", "content": "be brief and kind"},
        {"role": "user", "content": parts},  # two parts stay parts: the template gets them joined by a newline
        {"role": "assistant", "reasoning": "look it up", "tool_calls": [  # arguments as json.dumps writes them
            {"id": "t1", "type": "function", "function": {"name": "search", "arguments": '{"q": 1}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "nothing\nat all"},  # the user message had only results
    ]
    assert view["tools"] == [{"type": "function", "function": {
        "name": "search", "description": "look", "parameters": {"type": "object"}, "strict": None,
        "defer_loading": None}}]


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "max_tokens": 5}, "messages"),
    ({"model": "tiny", "max_tokens": 5, "messages": []}, "messages"),
    ({"model": "tiny", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content"),
    ({**ASK, "system": 5}, "system"),
    ({**ASK, "tools": [1]}, "tools"),
    ({**ASK, "max_tokens": 0}, "max_tokens"),
])
async def test_bad_messages_input_is_a_400_anthropic_clients_read(aiohttp_client, upstream, body, param):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    resp = await client.post("/v1/messages", json=body)
    assert resp.status == 400
    err = await resp.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"  # Anthropic's shape
    assert err["error"]["param"] == param and err["error"]["message"]  # and OpenAI's
    assert not upstream.app[SEEN]


async def test_the_caller_s_x_api_key_is_its_key(aiohttp_client, upstream):
    governance = {"tenants": [{"name": "acme", "keys": ["sk-acme"]}]}
    client = await aiohttp_client(create_app(config(worker_url(upstream), governance=governance), clock=FakeClock()))
    assert (await client.post("/v1/messages", json=ASK, headers={"x-api-key": "sk-acme"})).status == 200
    refused = await client.post("/v1/messages", json=ASK, headers={"x-api-key": "sk-wrong"})
    assert refused.status == 401 and (await refused.json())["error"]["code"] == "invalid_api_key"
    assert (await client.post("/v1/messages", json=ASK, headers={"x-api-key": "caf\u00e9"})).status == 400


async def test_a_messages_stream_past_its_budget_ends_with_an_error_event(aiohttp_client, upstream):
    governance = {"budgets": [{"name": "per-call", "scope": "request", "limit": {"tokens": 30}}],
                  "estimate_factor": 1}
    client = await aiohttp_client(create_app(config(worker_url(upstream), governance=governance), clock=FakeClock()))
    resp = await client.post("/v1/messages", json={**ASK, "stream": True, "fake_output_tokens": 40,
                                                   "fake_ignore_max_tokens": True})
    events = [e for e in (await resp.read()).decode().split("\n\n") if e]
    deltas = sum(e.startswith("event: content_block_delta") for e in events)
    name, data = events[-1].split("\n", 1)
    assert name == "event: error"  # Anthropic's clients skip an unnamed event
    err = orjson.loads(data.removeprefix("data: "))
    assert err["type"] == "error" and err["error"]["code"] == "budget_exceeded"
    assert deltas == upstream.app[SEEN][-1]["max_tokens"]


async def test_prompt_logs_carry_a_messages_answer(aiohttp_client, upstream, tmp_path):
    path = tmp_path / "prompts.jsonl"
    cfg = config(worker_url(upstream), telemetry={"prompt_logs": {"enabled": True, "file": {"path": str(path)}}})
    client = await aiohttp_client(create_app(cfg))
    assert (await client.post("/v1/messages", json=ASK)).status == 200
    await (await client.post("/v1/messages", json={**ASK, "stream": True, "max_tokens": 2})).read()
    client.app[keys.TELEMETRY].close()  # flush the file
    whole, streamed = (orjson.loads(line) for line in path.read_text().splitlines())
    assert whole["request"]["messages"][0] == {"role": "system", "content": "answer briefly"}
    assert whole["response"] == {"text": "word word word", "finish_reason": "stop"}
    assert whole["usage"] == {"prompt_tokens": 20, "completion_tokens": 3, "cached_tokens": 8}
    assert streamed["response"] == {"text": "word word", "finish_reason": "length"}


async def test_count_tokens_is_passed_through_and_charges_nothing(aiohttp_client, upstream):
    governance = {"budgets": [{"name": "day", "scope": "global", "window": "day", "limit": {"tokens": 100000}}]}
    client = await aiohttp_client(create_app(config(worker_url(upstream), governance=governance), clock=FakeClock()))
    ask = {k: v for k, v in ASK.items() if k != "max_tokens"}  # count_tokens takes none
    resp = await client.post("/v1/messages/count_tokens", json=ask)
    assert resp.status == 200 and (await resp.json())["input_tokens"] > 0
    assert upstream.app[SEEN][-1] == {**ask, "model": "tiny-up", "path": "/v1/messages/count_tokens"}
    bad = await client.post("/v1/messages/count_tokens", json={"model": "tiny", "messages": []})
    assert bad.status == 400 and (await bad.json())["error"]["param"] == "messages"
    gov = client.server.app[keys.GOVERNOR]
    await gov.drain()
    state = next(s for k, s in gov.store._states.items() if k.startswith("day:"))
    assert state.used_t == 0 and state.res_t == 0  # nothing generated, no usage: nothing spent


async def test_a_token_count_leaves_no_trace_in_the_prefix_index(aiohttp_client, upstream):
    """The worker only counts: nothing is prefilled, so the count records no blocks there
    and a request after it is not predicted a cache hit it will not get."""
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    long = {**ASK, "system": "You are the platform team's coding agent. " * 40}
    count = await client.post("/v1/messages/count_tokens", json={k: v for k, v in long.items() if k != "max_tokens"})
    assert count.status == 200 and count.headers["x-kvroute-predicted-cached-tokens"] == "0"
    assert len(client.app[keys.ROUTES].get("tiny").tiers[0].index) == 0
    first = await client.post("/v1/messages", json=long)
    assert first.headers["x-kvroute-predicted-cached-tokens"] == "0"  # the count cached nothing
    again = await client.post("/v1/messages", json=long)
    assert int(again.headers["x-kvroute-predicted-cached-tokens"]) > 0


def test_claude_codes_billing_block_does_not_split_a_session():
    """It changes on every request; a session fingerprinted from the prompt's opening
    (governance.session_id.derive: fingerprint) must not change with it."""
    from kvroute.router.governance.identity import derive_session

    def session(billing: str, question: str) -> str | None:
        body = {"model": "m", "max_tokens": 5, "system": [{"type": "text", "text": billing},
                                                          {"type": "text", "text": "You are a coding agent."}],
                "messages": [{"role": "user", "content": "Fix main.py"}, {"role": "assistant", "content": "Done."},
                             {"role": "user", "content": question}]}
        view = parse_request(MESSAGES, orjson.dumps(body), {}).prompt_view
        return derive_session(("fingerprint",), None, "kid", "t", view)[0]

    first = session("x-anthropic-billing-header: cc_version=2.1; cch=0a1b;", "Now the tests.")
    assert first is not None
    assert session("x-anthropic-billing-header: cc_version=2.1; cch=77ff;", "And the docs.") == first
