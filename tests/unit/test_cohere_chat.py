"""Cohere's chat API (``/cohere/v2/chat``, which vLLM serves with the cohere SDK and
``VLLM_ENABLE_COHERE_API=1``) through the router against the fake worker: read as the chat
vLLM renders from it, so it is keyed as that chat; its usage (floats, in ``usage.tokens``, a
stream's in ``message-end``) counted; its stream metered and cut by a budget; refused where
tenants' caches are kept apart, since vLLM takes no cache salt there; bad input a 400 that
names the field. ``tests/integration/test_cohere_chat_fleet.py`` runs it on a real worker
with the Cohere client."""

from __future__ import annotations

import orjson
import pytest

from kvroute.benchmarks.backends.mock import SEEN
from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.prefix import Prefixer, PromptTokenizer
from kvroute.router.requests import CHAT, COHERE_CHAT, COHERE_CHAT_RENDER, parse_request
from tests.clock import FakeClock
from tests.governance.conftest import KEY_A, TENANTS, bearer, make_client, worker_url
from tests.unit.apis import config, counter, refused

SYSTEM = "You answer questions about KV caches, briefly and exactly. " * 30


def parsed(kind: str, **body):
    return parse_request(kind, orjson.dumps({"model": "m", **body}), {})


def test_a_cohere_chat_reads_as_the_chat_vllm_renders_from_it():
    cohere = parsed(COHERE_CHAT, max_tokens=5, strict_tools=True, documents=[
        "The router keys prompts.", {"id": "d9", "data": "Blocks are 32 tokens."}, {"data": {"title": "t"}}],
        tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Which worker?"}]},
            {"role": "assistant", "tool_plan": "Look it up.", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "lookup"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": [
                {"type": "document", "document": {"id": "r1", "data": {"worker": "w2"}}}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "w2 holds it."},
                                              {"type": "text", "text": "Worker 2."}]},
            {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "image_url",
                                                                            "image_url": {"url": "data:x"}}]},
        ])
    assert cohere.path == "/cohere/v2/chat" and cohere.max_tokens == 5 and cohere.sequences == 1
    assert cohere.prompt_view == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Which worker?"},
            {"role": "assistant", "reasoning": "Look it up.", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": [
                {"type": "text", "text": '{"data": {"worker": "w2"}, "id": "r1"}'}]},  # the SDK's field order
            {"role": "assistant", "content": "Worker 2.", "reasoning": "w2 holds it."},
            {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "image_url"}]},
        ],
        "chat_template_kwargs": {"documents": [
            {"id": "doc_0", "data": {"text": "The router keys prompts."}},
            {"id": "d9", "data": {"text": "Blocks are 32 tokens."}},
            {"id": "doc_2", "data": {"title": "t"}}]},
        "tools": [{"type": "function", "function": {"name": "lookup", "description": None,
                                                    "parameters": {"type": "object"}, "strict": True}}],
    }
    assert cohere.with_max_tokens(2).body["max_tokens"] == 2  # a budget's cut lands where vLLM reads it
    ignored = parsed(COHERE_CHAT, messages=[{"role": "user", "content": "hi"}], n=4, max_completion_tokens=9)
    assert ignored.sequences == 1 and ignored.max_tokens is None  # fields vLLM does not read there
    render = parsed(COHERE_CHAT_RENDER, messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True)
    assert render.prompt_view == {"messages": [{"role": "user", "content": "hi"}]} and render.max_tokens == 0


def test_its_keys_are_those_of_the_same_chat(tiny_model_dir):
    tok = PromptTokenizer(str(tiny_model_dir))
    chat = parsed(CHAT, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}])
    cohere = parsed(COHERE_CHAT, messages=[{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                                           {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    prefixer = Prefixer(tok, 256)
    assert prefixer.keys_sync(cohere.prompt_view, 16) == prefixer.keys_sync(chat.prompt_view, 16)


def ask(**extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "system", "content": SYSTEM},
                                          {"role": "user", "content": "Which worker holds it?"}], **extra}


async def test_a_cohere_chat_is_routed_by_its_prompt_and_its_usage_counted(aiohttp_client, upstream):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    first = await client.post("/cohere/v2/chat", json=ask(max_tokens=4))
    assert first.status == 200 and first.headers["x-kvroute-predicted-cached-tokens"] == "0"
    answer = await first.json()
    assert answer["message"]["content"][0]["text"] == " x x x"  # relayed as the worker wrote it
    assert upstream.app[SEEN][-1] == {**ask(max_tokens=4), "model": "tiny-up", "path": "/cohere/v2/chat"}
    again = await client.post("/cohere/v2/chat", json=ask(stream=True))
    assert int(again.headers["x-kvroute-predicted-cached-tokens"]) > 0  # the same system prompt
    events = [orjson.loads(e[6:]) for e in (await again.read()).split(b"\n\n") if e.startswith(b"data: {")]
    assert [e["type"] for e in events][-1] == "message-end" and "stream_options" not in upstream.app[SEEN][-1]
    page = (await (await client.get("/metrics")).read()).decode()
    prompt = answer["usage"]["tokens"]["input_tokens"]
    assert counter(page, "kvroute_worker_prompt_tokens_total") == 2 * prompt  # floats, counted as tokens
    assert counter(page, "kvroute_worker_completion_tokens_total") == 3 + 3  # the stream's, from message-end


async def test_a_budget_shrinks_a_cohere_chat_and_cuts_its_stream(aiohttp_client, upstream):
    per_call = {"name": "per-call", "scope": "request", "limit": {"tokens": 900}}
    client = await make_client(aiohttp_client, upstream, {"budgets": [per_call], "estimate_factor": 1}, FakeClock())
    whole = await client.post("/cohere/v2/chat", json=ask(max_tokens=5000))
    assert whole.status == 200 and 0 < upstream.app[SEEN][-1]["max_tokens"] < 900  # cut to the room left
    text = (await (await client.post("/cohere/v2/chat", json=ask(
        max_tokens=5000, stream=True, fake_output_tokens=2000, fake_ignore_max_tokens=True))).read()).decode()
    events = [orjson.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
    granted = upstream.app[SEEN][-1]["max_tokens"]
    deltas = [e for e in events if e.get("type") == "content-delta"]
    assert len(deltas) == granted and events[-1]["error"]["code"] == "budget_exceeded"
    # Cohere's protocol ends a failed stream with message-end, finish_reason ERROR
    assert events[-1]["type"] == "message-end" and events[-1]["delta"] == {
        "finish_reason": "ERROR", "error": events[-1]["error"]["message"]}
    await client.server.app[keys.GOVERNOR].drain()


async def test_isolated_tenants_are_refused_a_chat_vllm_cannot_salt(aiohttp_client, upstream):
    governance = {"tenants": TENANTS, "isolate_kv_cache": True}
    client = await make_client(aiohttp_client, upstream, governance, FakeClock())
    resp = await client.post("/cohere/v2/chat", json=ask(), headers=bearer(KEY_A))
    body = await resp.json()
    assert resp.status == 400 and "cache_salt" in body["message"] and not upstream.app[SEEN]
    chat = await client.post("/v1/chat/completions", json=ask(), headers=bearer(KEY_A))
    assert chat.status == 200 and upstream.app[SEEN][-1]["cache_salt"]  # the OpenAI chat is salted


GOOD = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "developer", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content"),
    ({"messages": [{"role": "assistant", "tool_calls": "c1"}]}, "messages[0].tool_calls"),
    ({**GOOD, "tools": [{"type": "function", "function": "lookup"}]}, "tools"),
    ({**GOOD, "documents": "a doc"}, "documents"),
    ({**GOOD, "documents": [1]}, "documents"),
    ({**GOOD, "chat_template_kwargs": []}, "chat_template_kwargs"),
    ({**GOOD, "max_tokens": 0}, "max_tokens"),
    ({**GOOD, "stream": "yes"}, "stream"),
])
async def test_bad_input_is_a_400_that_names_the_field(aiohttp_client, upstream, body, param):
    err = await refused(aiohttp_client, upstream, "/cohere/v2/chat", body)
    assert err["param"] == param, err
