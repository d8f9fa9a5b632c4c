"""vLLM's generative scoring (``/generative_scoring``: a query and items, each scored by the
probabilities of label tokens after query + item) through the router against the fake
worker: keyed as vLLM builds the first item's prompt, so requests that share a query share a
worker; one token counted and reserved per item; never moved to another tier; a repeat
answered by the exact cache; bad input a 400 that names the field.
``tests/integration/test_generative_scoring_fleet.py`` runs it on a real vLLM worker."""

from __future__ import annotations

import orjson
import pytest

from kvroute.benchmarks.backends.mock import SEEN
from kvroute.router.app import create_app
from kvroute.router.governance import loops
from kvroute.router.prefix import Prefixer, PromptTokenizer, chain_keys, rest_of_batch_tokens
from kvroute.router.requests import GENERATIVE_SCORING, parse_request
from tests.governance.conftest import worker_url
from tests.unit.apis import config, counter, refused

QUERY = "Is the following review positive or negative? Answer yes or no. " * 20


def parsed(**body):
    return parse_request(GENERATIVE_SCORING, orjson.dumps({"model": "m", "label_token_ids": [5, 6], **body}), {})


def test_what_the_router_reads_of_a_generative_scoring_request():
    req = parsed(query="q", items=["a", "bb", "ccc"], stream=True, max_tokens=50)
    assert req.path == "/generative_scoring"
    assert req.prompt_view == {"prompt": "q", "items": ["a", "bb", "ccc"], "item_first": False}
    assert req.max_tokens == 1 and req.sequences == 3  # one token for each item, whatever the body says
    assert req.with_max_tokens(7) is req  # vLLM reads no max_tokens here: nothing to cut
    assert not req.stream  # vLLM answers whole, and ignores 'stream'
    view = parsed(query=[1, 2], items=[[3], [4, 5]], item_first=True, add_special_tokens=False).prompt_view
    assert view == {"prompt": [1, 2], "items": [[3], [4, 5]], "item_first": True, "add_special_tokens": False}
    # The other items' prompts count toward load and budgets, each with the query again
    assert rest_of_batch_tokens(view) == 2 + 2
    assert rest_of_batch_tokens(parsed(query="q" * 40, items=["a", "b" * 8]).prompt_view) == 11 + 3


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return PromptTokenizer(str(tiny_model_dir))


@pytest.mark.parametrize("extra", [{}, {"item_first": True}, {"add_special_tokens": False}])
def test_the_keys_are_those_of_the_prompt_vllm_builds(tok, extra):
    """vLLM encodes the query with the tokenizer's special tokens (unless told not to) and
    each item without, and joins their ids (vllm/entrypoints/generate/generative_scoring)."""
    items = ["A film I would watch again, twice.", "Dull."]
    view = parsed(query=QUERY, items=items, **extra).prompt_view
    query = tok.tok(QUERY, add_special_tokens=extra.get("add_special_tokens", True)).input_ids
    item = tok.tok(items[0], add_special_tokens=False).input_ids
    ids = item + query if extra.get("item_first") else query + item
    keys = Prefixer(tok, 256).keys_sync(view, 16)
    assert keys.exact and keys.prompt_tokens == len(ids) and keys.block_keys == tuple(chain_keys(ids, 16))


def test_token_ids_are_keyed_as_they_are(tok):
    view = parsed(query=list(range(100, 140)), items=[list(range(7, 31)), [3]]).prompt_view
    keys = Prefixer(tok, 256).keys_sync(view, 16)
    assert keys.block_keys == tuple(chain_keys(list(range(100, 140)) + list(range(7, 31)), 16))


async def test_requests_that_share_a_query_share_a_worker_and_are_counted(aiohttp_client, upstream):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    ask = {"model": "tiny", "query": QUERY, "items": ["good", "bad", "fine"], "label_token_ids": [5, 6]}
    first = await client.post("/generative_scoring", json=ask)
    assert first.status == 200 and first.headers["x-kvroute-predicted-cached-tokens"] == "0"
    answer = await first.json()
    assert [d["index"] for d in answer["data"]] == [0, 1, 2]
    seen = upstream.app[SEEN][-1]
    assert seen == {**ask, "model": "tiny-up", "path": "/generative_scoring"}  # sent as it came
    again = await client.post("/generative_scoring", json={**ask, "items": ["other", "items"]})
    assert int(again.headers["x-kvroute-predicted-cached-tokens"]) > 0  # the query's blocks
    page = (await (await client.get("/metrics")).read()).decode()
    prompt = answer["usage"]["prompt_tokens"] + (await again.json())["usage"]["prompt_tokens"]
    assert counter(page, "kvroute_worker_prompt_tokens_total") == prompt  # the worker's counts
    assert counter(page, "kvroute_worker_completion_tokens_total") == 3 + 2  # a token per item


async def test_a_repeat_is_answered_by_the_exact_cache(aiohttp_client, upstream):
    """Label probabilities after a prefill are the same again: no sampler, no temperature."""
    client = await aiohttp_client(create_app(config(worker_url(upstream), cache={"exact": True})))
    ask = {"model": "tiny", "query": QUERY, "items": ["good", "bad"], "label_token_ids": [5, 6]}
    first, again = [await client.post("/generative_scoring", json=ask) for _ in range(2)]
    assert first.headers["x-kvroute-cache"] == "miss" and again.headers["x-kvroute-cache"] == "hit"
    assert (await again.json())["data"] == (await first.json())["data"] and len(upstream.app[SEEN]) == 1
    other = await client.post("/generative_scoring", json={**ask, "items": ["good", "fine"]})
    assert other.headers["x-kvroute-cache"] == "miss" and len(upstream.app[SEEN]) == 2


def test_one_query_with_new_items_is_no_loop():
    a = parsed(query="q", items=["a", "b"]).prompt_view
    b = parsed(query="q", items=["c", "d"]).prompt_view
    assert loops.signature(a) != loops.signature(b)
    assert loops.signature(a) == loops.signature(parsed(query="q", items=["a", "b"]).prompt_view)


GOOD = {"query": "q", "items": ["a"], "label_token_ids": [5]}


@pytest.mark.parametrize("body, param", [
    ({**GOOD, "query": None}, "query"),
    ({**GOOD, "query": []}, "query"),
    ({**GOOD, "query": [1, -1]}, "query"),
    ({**GOOD, "query": {"text": "q"}}, "query"),
    ({**GOOD, "items": []}, "items"),
    ({**GOOD, "items": "a"}, "items"),
    ({**GOOD, "items": ["a", [1, 2]]}, "items"),  # vLLM takes texts or ids, not both
    ({**GOOD, "items": [[1], []]}, "items"),
    ({**GOOD, "items": [[1, 2**32]]}, "items"),
    ({**GOOD, "label_token_ids": []}, "label_token_ids"),
    ({**GOOD, "label_token_ids": [True]}, "label_token_ids"),
    ({"query": "q", "items": ["a"]}, "label_token_ids"),
    ({**GOOD, "item_first": "yes"}, "item_first"),
    ({**GOOD, "add_special_tokens": 1}, "add_special_tokens"),
    ({**GOOD, "cache_salt": ""}, "cache_salt"),
])
async def test_bad_input_is_a_400_that_names_the_field(aiohttp_client, upstream, body, param):
    err = await refused(aiohttp_client, upstream, "/generative_scoring", body)
    assert err["param"] == param, err
