"""vLLM's generative scoring through the router on the session's real fleet, in exact mode:
each item's prompt is the query's token ids and the item's, as the router keys it, so
requests that share a query go to the worker that holds it, and a completion of the first
item's prompt afterwards finds there the hit the router predicts (vLLM's scoring answer
reports no cached tokens of its own). A repeat is the exact cache's."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from tests.integration.conftest import BLOCK_SIZE, run_router, short_lived_guesses
from tests.integration.workload import system_prompt

pytestmark = pytest.mark.integration


def test_items_that_share_a_query_share_its_worker_and_blocks(fleet, tmp_path):
    query = system_prompt(random.Random(7), 120) + "\nDoes the following text answer the question?"
    items = [" Yes, it holds the prefix.", " No.", " It depends on the worker's load."]
    config = {**short_lived_guesses(fleet), "cache": {"exact": True}}
    with run_router(config, tmp_path) as router:

        async def go():
            async with aiohttp.ClientSession() as s:
                async def tokens(text: str, special: bool) -> list[int]:
                    async with s.post(f"{fleet.urls[0]}/tokenize", json={
                            "model": "tiny", "prompt": text, "add_special_tokens": special}) as r:
                        return (await r.json())["tokens"]

                query_ids = await tokens(query, True)
                item_ids = [await tokens(item, False) for item in items]
                ask = {"model": "tiny", "query": query, "items": items, "label_token_ids": [5, 6]}
                async with s.post(f"{router.url}/generative_scoring", json=ask) as r:
                    assert r.status == 200, await r.text()
                    answer = await r.json()
                    worker = r.headers["x-kvroute-worker"]
                    assert r.headers["x-kvroute-predicted-cached-tokens"] == "0"
                    assert r.headers["x-kvroute-cache"] == "miss"
                assert [d["index"] for d in answer["data"]] == [0, 1, 2]
                assert all(0.0 <= d["score"] <= 1.0 for d in answer["data"])
                usage = answer["usage"]
                assert usage["prompt_tokens"] == sum(len(query_ids) + len(i) for i in item_ids)
                assert usage["completion_tokens"] == 3
                await asyncio.sleep(1.0)  # the worker's events reach the router, its guesses expire

                async with s.post(f"{router.url}/generative_scoring", json={**ask, "items": [" Maybe."]}) as r:
                    assert r.status == 200 and r.headers["x-kvroute-worker"] == worker
                    predicted = int(r.headers["x-kvroute-predicted-cached-tokens"])
                assert predicted >= (len(query_ids) // BLOCK_SIZE - 1) * BLOCK_SIZE  # the query's blocks

                prompt = query_ids + item_ids[0]  # the first item's prompt, as vLLM built it
                async with s.post(f"{router.url}/v1/completions", json={
                        "model": "tiny", "prompt": prompt, "max_tokens": 1}) as r:
                    assert r.status == 200 and r.headers["x-kvroute-worker"] == worker
                    cached = ((await r.json())["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                    predicted = int(r.headers["x-kvroute-predicted-cached-tokens"])
                assert cached >= (len(prompt) // BLOCK_SIZE - 1) * BLOCK_SIZE
                assert cached <= predicted <= cached + BLOCK_SIZE

                page = await (await s.get(f"{router.url}/metrics")).text()
                completion = sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
                                 if line.startswith("kvroute_worker_completion_tokens_total{"))
                assert completion == 3 + 1 + 1  # a token for each item scored, and the completion's

                async with s.post(f"{router.url}/generative_scoring", json=ask) as r:
                    assert r.headers["x-kvroute-cache"] == "hit" and (await r.json())["data"] == answer["data"]

                async with s.post(f"{router.url}/generative_scoring", json={**ask, "label_token_ids": [10**6]}) as r:
                    assert r.status == 400 and "label_token_id" in (await r.json())["error"]["message"]  # vLLM's

        asyncio.run(go())
