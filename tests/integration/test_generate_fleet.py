"""vLLM's token-in API and its renders through the router, on the session's real fleet
(local workers run with ``--enable-scale-out``), in exact mode: a chat rendered to token ids
and generated from them is keyed as the chat is, so the chat that follows is sent to the
worker that holds its blocks, and exact mode predicts what vLLM finds."""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
import pytest

from tests.integration.conftest import BLOCK_SIZE, LORA_ADAPTER, run_router, short_lived_guesses
from tests.integration.workload import system_prompt

pytestmark = pytest.mark.integration


def a_hit(predicted: int, cached: int, at_least: int) -> bool:
    return cached >= at_least and cached <= predicted <= cached + BLOCK_SIZE


def cached_of(usage: dict) -> int:
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def test_a_rendered_chat_is_generated_and_keyed_as_the_chat(fleet, tmp_path):
    config = short_lived_guesses(fleet)
    config["models"][0]["name"] = "agent"  # a name of the router's own: renders come back under it
    messages = [{"role": "system", "content": system_prompt(random.Random(), 150)},
                {"role": "user", "content": "Which worker holds this conversation?"}]
    with run_router(config, tmp_path) as router:

        async def go():
            async with aiohttp.ClientSession() as s:
                async with s.post(f"{router.url}/v1/chat/completions/render", json={
                        "model": "agent", "messages": messages, "max_tokens": 2, "temperature": 0}) as r:
                    assert r.status == 200, await r.text()
                    rendered = await r.json()
                async with s.post(f"{fleet.urls[0]}/tokenize", json={"model": "tiny", "messages": messages}) as r:
                    assert rendered["token_ids"] == (await r.json())["tokens"]  # the chat's own ids
                assert rendered["model"] == "agent" and rendered["sampling_params"]["max_tokens"] == 2

                async with s.post(f"{router.url}/inference/v1/generate", json=rendered) as r:
                    assert r.status == 200, await r.text()
                    answer = await r.json()
                    first = (int(r.headers["x-kvroute-predicted-cached-tokens"]), cached_of(answer["usage"]))
                    worker = r.headers["x-kvroute-worker"]
                assert first == (0, 0) and answer["usage"]["prompt_tokens"] == len(rendered["token_ids"])
                assert len(answer["choices"][0]["token_ids"]) == 2
                await asyncio.sleep(1.0)  # the worker's events reach the router, its guesses expire

                blocks = len(rendered["token_ids"]) // BLOCK_SIZE
                async with s.post(f"{router.url}/v1/chat/completions", json={
                        "model": "agent", "messages": messages, "max_tokens": 2}) as r:
                    assert r.status == 200, await r.text()
                    usage = (await r.json())["usage"]
                    assert r.headers["x-kvroute-worker"] == worker
                    assert a_hit(int(r.headers["x-kvroute-predicted-cached-tokens"]), cached_of(usage),
                                 (blocks - 1) * BLOCK_SIZE)

                follow_up = {**rendered, "token_ids": rendered["token_ids"] + answer["choices"][0]["token_ids"]
                             + list(range(300, 340)), "stream": True, "stream_options": {"include_usage": True}}
                async with s.post(f"{router.url}/inference/v1/generate", json=follow_up) as r:
                    assert r.status == 200 and r.headers["x-kvroute-worker"] == worker
                    events = [json.loads(line[6:]) for line in (await r.text()).split("\n")
                              if line.startswith("data: {")]
                    predicted = int(r.headers["x-kvroute-predicted-cached-tokens"])
                assert a_hit(predicted, cached_of(events[-1]["usage"]), blocks * BLOCK_SIZE)
                assert sum(len(e["choices"][0]["token_ids"]) for e in events if e["choices"]) == 2

        asyncio.run(go())


def test_a_generate_request_that_vllm_refuses_passes_its_error_through(fleet, tmp_path):
    with run_router(fleet.router_config(), tmp_path) as router:

        async def go():
            async with aiohttp.ClientSession() as s, s.post(f"{router.url}/inference/v1/generate", json={
                    "model": "tiny", "token_ids": [1, 2, 3], "sampling_params": {"temperature": -1}}) as r:
                assert r.status == 400 and "temperature" in (await r.text())

        asyncio.run(go())


def test_ids_under_a_lora_adapter_are_keyed_apart_from_the_base_models(lora_fleet, tmp_path):
    """vLLM hashes the adapter into every block: the adapter's repeat is a hit, predicted and
    found; the same ids on the base model find nothing, and the router predicts nothing."""
    rng = random.Random()
    ids = [rng.randrange(3, 2000) for _ in range(6 * BLOCK_SIZE)]  # fresh: no earlier test cached them
    with run_router(short_lived_guesses(lora_fleet), tmp_path) as router:

        async def send(model: str) -> tuple[int, int]:
            async with aiohttp.ClientSession() as s, s.post(f"{router.url}/inference/v1/generate", json={
                    "model": model, "token_ids": ids, "sampling_params": {"max_tokens": 1}}) as r:
                assert r.status == 200, await r.text()
                return int(r.headers["x-kvroute-predicted-cached-tokens"]), cached_of((await r.json())["usage"])

        async def go():
            assert await send(LORA_ADAPTER) == (0, 0)
            await asyncio.sleep(1.0)
            assert a_hit(*await send(LORA_ADAPTER), 5 * BLOCK_SIZE)
            assert await send("tiny") == (0, 0)

        asyncio.run(go())


def test_several_choices_stream_to_their_end_under_a_budget(fleet, tmp_path):
    """vLLM generates max_tokens for each choice: a per-request budget reserves for all of
    them, and neither a chat's nor a generate request's stream is cut short."""
    config = {**fleet.router_config(), "governance": {
        "budgets": [{"name": "per-call", "scope": "request", "limit": {"tokens": 2000}}]}}
    with run_router(config, tmp_path) as router:

        async def stream(path: str, body: dict) -> list[dict]:
            async with aiohttp.ClientSession() as s, s.post(f"{router.url}{path}", json={
                    "model": "tiny", "stream": True, "stream_options": {"include_usage": True}, **body}) as r:
                assert r.status == 200, await r.text()
                return [json.loads(line[6:]) for line in (await r.text()).split("\n") if line.startswith("data: {")]

        async def go():
            chat = await stream("/v1/chat/completions", {
                "messages": [{"role": "user", "content": "Count to twenty."}], "n": 2, "max_tokens": 24,
                "min_tokens": 24, "temperature": 1.0})
            assert "error" not in chat[-1] and chat[-1]["usage"]["completion_tokens"] == 48
            assert {c["index"] for e in chat for c in e["choices"]} == {0, 1}
            generated = await stream("/inference/v1/generate", {
                "token_ids": list(range(5, 60)), "sampling_params": {"n": 2, "max_tokens": 24, "min_tokens": 24}})
            assert "error" not in generated[-1] and generated[-1]["usage"]["completion_tokens"] == 48
            assert sum(len(c["token_ids"]) for e in generated for c in e["choices"]) == 48

        asyncio.run(go())
