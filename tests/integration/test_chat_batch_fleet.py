"""vLLM's ``/v1/chat/completions/batch`` through the router on the session's real fleet: one
answer per conversation, every token counted, and in exact mode the blocks of all the
batch's conversations known from the worker's events, so a later chat of any of them is
sent where they are and the hit predicted is the hit vLLM finds."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from tests.integration.conftest import BLOCK_SIZE, run_router, short_lived_guesses
from tests.integration.workload import system_prompt

pytestmark = pytest.mark.integration


def test_a_batch_is_answered_and_its_conversations_blocks_are_known(fleet, tmp_path):
    system = {"role": "system", "content": system_prompt(random.Random(), 120)}
    batch = [[system, {"role": "user", "content": q}] for q in (
        "Which worker holds this prompt?", "How many blocks does it take?", "Who evicts them?")]
    with run_router(short_lived_guesses(fleet), tmp_path) as router:

        async def go():
            async with aiohttp.ClientSession() as s:
                async with s.post(f"{router.url}/v1/chat/completions/batch", json={
                        "model": "tiny", "messages": batch, "max_tokens": 3}) as r:
                    assert r.status == 200, await r.text()
                    answer = await r.json()
                    worker = r.headers["x-kvroute-worker"]
                assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
                assert answer["usage"]["completion_tokens"] <= 9
                await asyncio.sleep(1.0)  # the worker's events reach the router, its guesses expire
                async with s.post(f"{router.url}/v1/chat/completions", json={
                        "model": "tiny", "messages": batch[2], "max_tokens": 1}) as r:
                    assert r.status == 200 and r.headers["x-kvroute-worker"] == worker
                    cached = ((await r.json())["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                    predicted = int(r.headers["x-kvroute-predicted-cached-tokens"])
                assert cached >= 3 * BLOCK_SIZE and cached <= predicted <= cached + BLOCK_SIZE
                page = await (await s.get(f"{router.url}/metrics")).text()
                prompt = sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
                             if line.startswith("kvroute_worker_prompt_tokens_total{"))
                assert prompt >= answer["usage"]["prompt_tokens"] > 3 * 120  # every conversation counted

        asyncio.run(go())
