"""``/v1/responses`` (OpenAI's Responses API) through the router against the fake worker:
the prompt read as chat messages, usage accounted under its own names, governance's
max_output_tokens and stream meter, bad input."""

from __future__ import annotations

import orjson
import pytest

from kvroute.benchmarks.backends.mock import SEEN
from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.requests import RESPONSES, parse_request
from tests.clock import FakeClock
from tests.governance.conftest import worker_url
from tests.unit.apis import config, counter

ASK = {"model": "tiny", "input": "what is a KV cache?", "instructions": "answer briefly", "max_output_tokens": 50}


async def test_a_responses_request_is_passed_through_and_its_usage_counted(aiohttp_client, upstream):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    resp = await client.post("/v1/responses", json=ASK)
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "response" and body["output"][0]["content"][0]["text"] == "word word word"
    assert upstream.app[SEEN][-1] == {**ASK, "model": "tiny-up", "path": "/v1/responses"}
    stream = await client.post("/v1/responses", json={**ASK, "stream": True})
    text = (await stream.read()).decode()
    assert stream.headers["content-type"].startswith("text/event-stream")
    kinds = [e.split("\n", 1)[0] for e in text.split("\n\n") if e]
    assert kinds == ["event: response.created", *["event: response.output_text.delta"] * 3,
                     "event: response.completed"]  # as the worker sent them: no usage chunk, no [DONE]
    assert "stream_options" not in upstream.app[SEEN][-1]
    metrics = (await (await client.get("/metrics")).read()).decode()
    assert counter(metrics, "kvroute_worker_prompt_tokens_total") == 40
    assert counter(metrics, "kvroute_worker_completion_tokens_total") == 6
    assert counter(metrics, "kvroute_worker_cached_prompt_tokens_total") == 16
    assert (await client.get("/v1/responses")).status == 405
    stored = await client.get("/v1/responses/resp_x")  # tests/unit/test_stored_responses.py has the rest
    assert stored.status == 404 and "resp_x" in (await stored.json())["error"]["message"]


def test_the_prompt_is_read_as_the_chat_messages_vllm_renders():
    """As vLLM's construct_input_messages builds it: a call, reasoning or text joins the
    assistant message before it while that lacks one; an assistant message keeps its first
    part's text; other messages go as they are."""
    parts = [{"type": "input_text", "text": "find "}, {"type": "input_text", "text": "it"}]
    body = {"model": "m", "instructions": "be brief", "input": [
        {"role": "user", "content": parts},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "search first"}]},
        {"type": "function_call", "call_id": "c1", "name": "search", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "search", "arguments": "{\"q\": 2}"},
        {"type": "function_call_output", "call_id": "c1", "output": "nothing"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "None."},
                                                             {"type": "output_text", "text": "Sorry."}]},
        {"type": "reasoning", "summary": []},
    ], "tools": [{"type": "function", "name": "search", "parameters": {"type": "object"}}]}
    view = parse_request(RESPONSES, orjson.dumps(body), {}).prompt_view
    call = {"type": "function", "function": {"name": "search", "arguments": "{}"}}
    assert view["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": parts},
        {"role": "assistant", "reasoning": "search first", "tool_calls": [
            {"id": "c1", **call}, {"id": "c2", **call, "function": {"name": "search", "arguments": '{"q": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "nothing"},
        {"role": "assistant", "content": "None.", "reasoning": ""},
    ]
    assert view["tools"] == [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
    # a call joins an assistant message sent as it is; the body the worker gets keeps it as it was
    empty = {"role": "assistant", "content": []}
    req = parse_request(RESPONSES, orjson.dumps({"model": "m", "input": [empty, body["input"][2]]}), {})
    assert req.prompt_view["messages"][0]["tool_calls"][0]["id"] == "c1" and req.body["input"][0] == empty
    plain = parse_request(RESPONSES, b'{"model": "m", "input": "hi"}', {})
    # keyed with the tokenizer's special tokens, as vLLM tokenizes a Responses prompt
    assert plain.prompt_view == {"messages": [{"role": "user", "content": "hi"}], "add_special_tokens": True}
    assert plain.max_tokens is None


async def test_a_shared_instruction_is_predicted_cached(aiohttp_client, upstream):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    long = {**ASK, "instructions": "You are the routing team's assistant. " * 20}
    first = await client.post("/v1/responses", json=long)
    second = await client.post("/v1/responses", json={**long, "input": "another question"})
    assert first.headers["x-kvroute-predicted-cached-tokens"] == "0"
    assert int(second.headers["x-kvroute-predicted-cached-tokens"]) > 0


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny"}, "input"),
    ({"model": "tiny", "input": ""}, "input"),
    ({"model": "tiny", "input": []}, "input"),
    ({"model": "tiny", "input": ["text"]}, "input[0]"),
    ({"model": "tiny", "input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
    ({"model": "tiny", "input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"model": "tiny", "input": [{"role": "user", "content": ["x"]}]}, "input[0].content"),
    ({"model": "tiny", "input": "x", "instructions": 3}, "instructions"),
    ({"model": "tiny", "input": "x", "tools": {"a": 1}}, "tools"),
    ({"model": "tiny", "input": "x", "tools": ["search"]}, "tools"),
    ({"model": "tiny", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "tiny", "input": "x", "previous_response_id": 7}, "previous_response_id"),
    ({"model": "tiny", "input": "x", "stream": "yes"}, "stream"),
])
async def test_bad_responses_input_is_a_400_that_names_the_field(aiohttp_client, upstream, body, param):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    resp = await client.post("/v1/responses", json=body)
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == param
    assert not upstream.app[SEEN]


async def test_governance_caps_max_output_tokens_and_settles_the_real_usage(aiohttp_client, upstream):
    governance = {"budgets": [{"name": "per-call", "scope": "request", "limit": {"tokens": 200}},
                              {"name": "day", "scope": "global", "window": "day", "limit": {"tokens": 100000}}],
                  "estimate_factor": 1}
    client = await aiohttp_client(create_app(config(worker_url(upstream), governance=governance), clock=FakeClock()))
    resp = await client.post("/v1/responses", json={**ASK, "max_output_tokens": 5000})
    assert resp.status == 200
    sent = upstream.app[SEEN][-1]["max_output_tokens"]
    assert 0 < sent < 200 and "max_tokens" not in upstream.app[SEEN][-1]
    gov = client.server.app[keys.GOVERNOR]
    await gov.drain()
    state = next(s for k, s in gov.store._states.items() if k.startswith("day:"))
    assert state.used_t == 20 + 3 and state.res_t == 0  # the worker's input and output tokens


async def test_a_responses_stream_past_its_budget_is_cut_between_deltas(aiohttp_client, upstream):
    governance = {"budgets": [{"name": "per-call", "scope": "request", "limit": {"tokens": 30}}],
                  "estimate_factor": 1}
    client = await aiohttp_client(create_app(config(worker_url(upstream), governance=governance), clock=FakeClock()))
    resp = await client.post("/v1/responses", json={**ASK, "stream": True, "fake_output_tokens": 40,
                                                    "fake_ignore_max_output_tokens": True})
    text = (await resp.read()).decode()
    events = [e for e in text.split("\n\n") if e]
    deltas = sum(e.startswith("event: response.output_text.delta") for e in events)
    last = orjson.loads(events[-1].split("data: ", 1)[1])
    assert last["error"]["code"] == "budget_exceeded" and last["error"]["param"] == "per-call"
    assert deltas == upstream.app[SEEN][-1]["max_output_tokens"]  # every delta the budget allowed


async def test_prompt_logs_and_spans_carry_a_responses_answer(aiohttp_client, upstream, tmp_path):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    path = tmp_path / "prompts.jsonl"
    exporter = InMemorySpanExporter()
    cfg = config(worker_url(upstream), telemetry={"prompt_logs": {"enabled": True, "file": {"path": str(path)}}})
    client = await aiohttp_client(create_app(cfg, span_exporter=exporter))
    assert (await client.post("/v1/responses", json=ASK)).status == 200
    stream = await client.post("/v1/responses", json={**ASK, "stream": True, "max_output_tokens": 2})
    await stream.read()
    client.app[keys.TELEMETRY].tracing.provider.force_flush()
    client.app[keys.TELEMETRY].close()  # flush the file
    whole, streamed = (orjson.loads(line) for line in path.read_text().splitlines())
    assert whole["request"]["messages"] == [{"role": "system", "content": "answer briefly"},
                                            {"role": "user", "content": "what is a KV cache?"}]
    assert whole["response"] == {"text": "word word word", "finish_reason": "stop"}
    assert whole["usage"] == {"prompt_tokens": 20, "completion_tokens": 3, "cached_tokens": 8}
    assert streamed["response"]["text"] == "word word" and streamed["usage"]["completion_tokens"] == 2
    servers = [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]
    assert {s.name for s in servers} == {"chat tiny"}
    assert all(s.attributes["gen_ai.response.finish_reasons"] == ("stop",) for s in servers)
