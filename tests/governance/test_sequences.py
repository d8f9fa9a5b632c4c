"""Budgets reserve for every sequence a request generates: ``n`` choices, a completion's
batch of prompts, a generate request's ``sampling_params.n``. vLLM reads ``max_tokens`` per
sequence, so a request is charged up to ``max_tokens`` times their number; a shrunk request
gets its share per sequence, and a stream is cut only past what all of them were granted."""

from __future__ import annotations

import orjson
import pytest

from kvroute.benchmarks.backends.mock import SEEN
from kvroute.router import keys
from kvroute.router.requests import CHAT, COMPLETION, GENERATE, GENERATIVE_SCORING, parse_request
from tests.governance.conftest import make_client

DAY = {"name": "day", "scope": "global", "window": "day", "limit": {"tokens": 100_000}}


def per_call(tokens: int) -> dict:
    return {"name": "per-call", "scope": "request", "limit": {"tokens": tokens}}


@pytest.mark.parametrize("kind, body, sequences", [
    (CHAT, {"messages": [{"role": "user", "content": "x"}]}, 1),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "n": 3}, 3),
    (COMPLETION, {"prompt": "x", "n": 2}, 2),
    (COMPLETION, {"prompt": ["a", "b", "c"]}, 3),
    (COMPLETION, {"prompt": [[1, 2], [3, 4]], "n": 2}, 4),
    (COMPLETION, {"prompt": [1, 2, 3]}, 1),  # token ids: one prompt
    (GENERATE, {"token_ids": [1, 2], "sampling_params": {"n": 8}}, 8),
    (GENERATIVE_SCORING, {"query": "q", "items": ["a", "b", "c", "d"], "label_token_ids": [5]}, 4),  # a token each
])
def test_the_sequences_a_request_generates(kind, body, sequences):
    assert parse_request(kind, orjson.dumps({"model": "m", **body}), {}).sequences == sequences


async def test_a_stream_of_several_choices_runs_to_its_end(aiohttp_client, upstream, clock):
    client = await make_client(aiohttp_client, upstream, {"budgets": [DAY]}, clock)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "n": 2,
            "stream": True, "fake_completion_tokens": 30, "fake_honor_max_tokens": True}
    text = (await (await client.post("/v1/chat/completions", json=body)).read()).decode()
    assert "budget_exceeded" not in text and text.count('"content":"x"') == 60  # 30 for each choice
    await client.server.app[keys.GOVERNOR].drain()


@pytest.mark.parametrize("path, body, read", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 500},
     lambda seen: seen["max_tokens"]),
    ("/v1/completions", {"prompt": ["hi", "ho"], "max_tokens": 500}, lambda seen: seen["max_tokens"]),
    ("/inference/v1/generate", {"token_ids": [1, 2, 3], "sampling_params": {"n": 2, "max_tokens": 500}},
     lambda seen: seen["sampling_params"]["max_tokens"]),
])
async def test_a_shrunk_request_gets_its_share_for_each_sequence(aiohttp_client, upstream, clock, path, body, read):
    client = await make_client(aiohttp_client, upstream, {"budgets": [per_call(200)], "estimate_factor": 1}, clock)
    resp = await client.post(path, json={"model": "tiny", **body})
    assert resp.status == 200, await resp.text()
    each = read(upstream.app[SEEN][-1])
    assert 80 <= each < 100  # (200 - the prompt) / 2: two sequences share the room
    await client.server.app[keys.GOVERNOR].drain()


async def test_a_generate_stream_past_its_grant_is_cut(aiohttp_client, upstream, clock):
    """A generate stream is metered by its token ids: a worker that ignores max_tokens is cut."""
    client = await make_client(aiohttp_client, upstream, {"budgets": [per_call(60), DAY], "estimate_factor": 1},
                               clock)
    body = {"model": "tiny", "token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 500}, "stream": True,
            "fake_completion_tokens": 200}
    text = (await (await client.post("/inference/v1/generate", json=body)).read()).decode()
    events = [e for e in text.split("\n\n") if e.startswith("data: {")]
    assert orjson.loads(events[-1][6:])["error"]["code"] == "budget_exceeded"
    granted = upstream.app[SEEN][-1]["sampling_params"]["max_tokens"]
    assert len(events) - 1 == granted  # every token the budget allowed, then the error
    await client.server.app[keys.GOVERNOR].drain()


async def test_generative_scoring_reserves_a_token_and_a_prompt_for_each_item(aiohttp_client, upstream, clock):
    """Each item's prompt repeats the query: a request is charged for all of them, and one
    whose items do not fit a budget is refused before a worker sees it."""
    client = await make_client(aiohttp_client, upstream, {"budgets": [per_call(1000), DAY], "estimate_factor": 1},
                               clock)
    ask = {"model": "tiny", "query": "q" * 400, "label_token_ids": [5]}
    fits = await client.post("/generative_scoring", json={**ask, "items": ["good", "bad"]})
    assert fits.status == 200, await fits.text()
    assert "max_tokens" not in upstream.app[SEEN][-1]  # nothing to cut: vLLM generates one token an item
    sent = len(upstream.app[SEEN])
    too_many = await client.post("/generative_scoring", json={**ask, "items": ["x"] * 12})  # 12 × ~101 tokens
    assert too_many.status == 429 and (await too_many.json())["error"]["code"] == "budget_exceeded"
    assert len(upstream.app[SEEN]) == sent
    await client.server.app[keys.GOVERNOR].drain()
