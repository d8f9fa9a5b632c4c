"""The semantic cache: the near-opposite check, the index, its config, and the cache on the
request path (paraphrase hits, tenant isolation, governance, Redis shared by two replicas).

The upstream is benchmarks/backends/mock.py's fake vLLM worker; the encoder is the shipped
MiniLM embedding layer; Redis is a real redis-server (tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orjson
import pytest

from kvroute.benchmarks.backends.mock import fake_worker
from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.cache import semantic_index
from kvroute.router.cache.config import DEFAULT_THRESHOLD
from kvroute.router.cache.semantic import normalise
from kvroute.router.cache.semantic_check import conflict
from kvroute.router.cache.semantic_index import SemanticIndex, Stored
from kvroute.router.config import config_from_dict
from kvroute.router.errors import ConfigError
from tests.clock import FakeClock, ManualClock
from tests.governance.conftest import PATIENT

PAIRS = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "semantic" / "near_opposites.jsonl"


# -- the near-opposite check ------------------------------------------------------------------

@pytest.mark.parametrize(("a", "b", "reason"), [
    ("How do I turn on dark mode?", "How do I turn off dark mode?", "antonym"),
    ("Is aspirin safe?", "Is aspirin unsafe?", "antonym"),
    ("Is aspirin safe?", "Is aspirin not safe?", "negation"),
    ("Why can I log in?", "Why can't I log in?", "negation"),
    ("What is 17 × 23?", "What is 17 × 24?", "number"),
    ("What is 23 - 17?", "What is 17 - 23?", "number"),
    ("What is five plus three?", "What is five plus four?", "number"),
    ("What is the capital of France?", "What is the capital of Spain?", "entity"),
    ("Book a flight from Paris to Rome.", "Book a flight from Rome to Paris.", "entity"),
    ("Why is the sky blue?", "Why is the sky red?", "antonym"),
])
def test_near_opposites_are_refused_with_their_reason(a, b, reason):
    assert conflict(a, b) == reason and conflict(b, a) == reason


@pytest.mark.parametrize(("a", "b"), [
    ("What is the capital of France?", "what is the capital of france"),
    ("What is the capital of France?", "Tell me the capital city of France."),
    ("How do I reset my password?", "How can I reset my password?"),
    ("What is twelve plus 3?", "What is 12 plus 3?"),
    ("Janet has 3 apples. She buys 4 pears. How many fruits?",
     "She buys 4 pears. Janet has 3 apples. How many fruits?"),
    ("WHAT IS THE CAPITAL OF PERU", "What is the capital of Peru?"),
])
def test_paraphrases_pass_the_check(a, b):
    assert conflict(a, b) is None


def test_the_shipped_near_opposite_pairs_never_hit_at_the_default_threshold():
    """benchmarks/data/semantic: every pair is refused by the threshold or by the check."""
    from kvroute.router.cache.semantic import Embedder

    embed = Embedder()
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    assert len(pairs) >= 300 and {p["kind"] for p in pairs} == {"negation", "antonym", "number", "entity"}
    hits = [p for p in pairs
            if float(embed(p["a"]) @ embed(p["b"])) >= DEFAULT_THRESHOLD and conflict(p["a"], p["b"]) is None]
    assert hits == []


# -- the index ----------------------------------------------------------------------------------

def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, 384)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_index_partitions_expire_evict_and_move_to_hnsw(monkeypatch):
    monkeypatch.setattr(semantic_index, "FLAT_MAX", 8)
    clock = FakeClock()
    index = SemanticIndex(384, max_entries=20, clock=clock)
    vecs = unit(np.random.default_rng(0), 25)
    for i in range(12):
        index.add("tenant:a", "sig", Stored(f"k{i}", f"text {i}", vecs[i], clock.time() + 10))
    part = index.partitions[("tenant:a", "sig")]
    assert part.graph is not None and len(part) == 12  # past FLAT_MAX: an HNSW graph
    score, found = index.search("tenant:a", "sig", vecs[5])[0]
    assert found.key == "k5" and score == pytest.approx(1.0, abs=1e-4)
    assert index.search("tenant:b", "sig", vecs[5]) == []  # another tenant's partition is empty
    assert index.search("tenant:a", "other", vecs[5]) == []  # another context too
    for i in range(12, 25):  # 25 entries into a 20-entry index: the five oldest go
        index.add("tenant:b", "sig", Stored(f"k{i}", f"text {i}", vecs[i], clock.time() + 10))
    assert len(index) == 20 and "k0" not in index.order and "k5" in index.order
    assert index.search("tenant:a", "sig", vecs[0])[0][1].key != "k0"
    clock.advance(11)
    assert index.search("tenant:b", "sig", vecs[20]) == []  # expired: not served ...
    assert len(index) == 16  # ... and the four candidates it met are dropped


def test_flat_partition_removes_by_swapping_in_the_last_row():
    index = SemanticIndex(384, max_entries=10)
    vecs = unit(np.random.default_rng(1), 3)
    for i in range(3):
        index.add("n", "s", Stored(f"k{i}", "", vecs[i], 1e12))
    index.remove("k0")
    assert [e.key for _, e in index.search("n", "s", vecs[2], k=4)] == ["k2", "k1"]


# -- config ----------------------------------------------------------------------------------

def model_config(url: str, top: dict | None = None, governance: dict | None = None, **model) -> dict:
    raw: dict = {"models": [{"name": "tiny", "workers": [url], "policy": "round_robin",
                             "price": {"input_per_m": 1.0, "output_per_m": 2.0}, **model}],
                 "health": {"interval_s": 60}}
    if top is not None:
        raw["cache"] = top
    if governance is not None:
        raw["governance"] = governance
    return raw


def test_semantic_config_defaults_overrides_and_errors():
    cfg = config_from_dict(model_config("http://w:1", {"semantic": {}}))
    sem = cfg.models[0].cache.semantic
    assert sem.threshold == DEFAULT_THRESHOLD and sem.ttl_s == 3600 and cfg.models[0].cache.exact is None
    cfg = config_from_dict(model_config("http://w:1", {"semantic": {"threshold": 0.99, "ttl_s": 5}},
                                        cache={"semantic": {"ttl_s": 60, "max_entries": 7, "sync_interval_s": 2,
                                                            "max_entry_bytes": 100, "greedy_by_default": True}}))
    sem = cfg.models[0].cache.semantic
    assert (sem.threshold, sem.ttl_s, sem.max_entries, sem.sync_interval_s, sem.max_entry_bytes,
            sem.greedy_by_default) == (0.99, 60, 7, 2, 100, True)
    assert config_from_dict(model_config("http://w:1", {"semantic": {}}, cache={"semantic": False})
                            ).models[0].cache.semantic is None
    assert config_from_dict(model_config("http://w:1", None, cache={"semantic": {}})).models[0].cache.semantic
    for bad, key in [({"semantic": {"threshold": 1.5}}, "cache.semantic.threshold"),
                     ({"semantic": {"threshold": 0}}, "cache.semantic.threshold"),
                     ({"semantic": {"threshold": "high"}}, "cache.semantic.threshold"),
                     ({"semantic": {"max_entries": 0}}, "cache.semantic.max_entries"),
                     ({"semantic": {"sync_interval_s": -1}}, "cache.semantic.sync_interval_s"),
                     ({"semantic": {"ttl_s": 0}}, "cache.semantic.ttl_s"),
                     ({"semantic": {"max_entry_bytes": 0}}, "cache.semantic.max_entry_bytes"),
                     ({"semantic": {"greedy_by_default": "yes"}}, "cache.semantic.greedy_by_default"),
                     ({"semantic": {"neighbours": 3}}, "cache.semantic.neighbours"),
                     ({"semantic": 3}, "cache.semantic")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config_from_dict(model_config("http://w:1", bad))
    with pytest.raises(ConfigError, match=r"models\[0\]\.cache\.semantic\.threshold"):
        config_from_dict(model_config("http://w:1", None, cache={"semantic": {"threshold": 2}}))


# -- on the request path -------------------------------------------------------------------------

@pytest.fixture
async def worker(aiohttp_server):
    return await aiohttp_server(fake_worker("w1"))


def chat(content: str, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


async def post(client, body: dict, headers: dict | None = None):
    resp = await client.post("/v1/chat/completions", json=body, headers=headers or {})
    return resp, await resp.read()


def metric(client, line: str) -> float:
    for row in client.app[keys.METRICS].render().decode().splitlines():
        if row.startswith(line + " "):
            return float(row.rsplit(" ", 1)[1])
    return 0.0


def spent(client, tenant: str) -> float:
    rows = client.app[keys.METRICS].render().decode().splitlines()
    return sum(float(r.rsplit(" ", 1)[1]) for r in rows
               if r.startswith("kvroute_spend_tokens_total{") and f'tenant="{tenant}"' in r)


def url(worker) -> str:
    return str(worker.make_url("")).rstrip("/")


async def test_a_paraphrase_is_a_semantic_hit_and_a_near_opposite_is_not(aiohttp_client, worker):
    client = await aiohttp_client(create_app(config_from_dict(model_config(url(worker), {"semantic": {}})),
                                             clock=FakeClock()))
    first, raw1 = await post(client, chat("How do I turn on dark mode in the settings app?"))
    assert first.headers["x-kvroute-cache"] == "miss"
    hit, raw2 = await post(client, chat("how do I turn on dark mode in the Settings app"))
    assert hit.headers["x-kvroute-cache"] == "hit" and hit.headers["x-kvroute-cache-kind"] == "semantic"
    assert float(hit.headers["x-kvroute-cache-similarity"]) >= DEFAULT_THRESHOLD
    a, b = orjson.loads(raw1), orjson.loads(raw2)
    assert b["choices"] == a["choices"] and b["usage"]["prompt_tokens_details"]["cached_tokens"] == \
        a["usage"]["prompt_tokens"]
    miss, _ = await post(client, chat("How do I turn off dark mode in the settings app?"))
    assert miss.headers["x-kvroute-cache"] == "miss"  # below the threshold already
    train = ("A train leaves the station at 3 pm and travels at 60 km per hour towards a city that is 240 km "
             "away. At what time does it arrive in the city?")
    await post(client, chat(train))
    near, _ = await post(client, chat(train.replace("240", "250")))  # cosine 0.9953: the check refuses it
    assert near.headers["x-kvroute-cache"] == "miss"
    m = 'kvroute_cache_requests_total{kind="semantic",model="tiny",result="%s"}'
    assert metric(client, m % "hit") == 1 and metric(client, m % "miss") == 4
    assert metric(client, 'kvroute_cache_semantic_vetoes_total{model="tiny",reason="number"}') == 1
    assert metric(client, 'kvroute_cache_saved_tokens_total{kind="semantic",model="tiny"}') == \
        a["usage"]["prompt_tokens"] + a["usage"]["completion_tokens"]
    assert metric(client, 'kvroute_cache_semantic_entries{model="tiny"}') == 4
    # A streaming client gets the same answer as SSE.
    streamed, raw = await post(client, chat("How do I turn on dark mode in the settings app", stream=True))
    assert streamed.headers["x-kvroute-cache"] == "hit" and raw.endswith(b"data: [DONE]\n\n")


async def test_the_context_signature_must_match(aiohttp_client, worker):
    client = await aiohttp_client(create_app(config_from_dict(model_config(url(worker), {"semantic": {}})),
                                             clock=FakeClock()))
    await post(client, chat("Summarise the plot of Hamlet.", max_tokens=100))
    assert (await post(client, chat("summarise the plot of Hamlet", max_tokens=120)))[0].headers[
        "x-kvroute-cache"] == "hit"  # one max_tokens bucket (65-128)
    system = {"role": "system", "content": "Answer in French."}
    for changed in (chat("Summarise the plot of Hamlet.", max_tokens=300),
                    {**chat("Summarise the plot of Hamlet.", max_tokens=100),
                     "messages": [system, {"role": "user", "content": "Summarise the plot of Hamlet."}]},
                    chat("Summarise the plot of Hamlet.", max_tokens=100, tools=[
                        {"type": "function", "function": {"name": "search", "parameters": {}}}])):
        assert (await post(client, changed))[0].headers["x-kvroute-cache"] == "miss"
    resp, _ = await post(client, chat("Summarise the plot of Hamlet.", temperature=0.8))
    assert resp.headers["x-kvroute-cache"] == "bypass"  # not deterministic


async def test_exact_and_semantic_together(aiohttp_client, worker):
    client = await aiohttp_client(create_app(config_from_dict(
        model_config(url(worker), {"exact": {}, "semantic": {}})), clock=FakeClock()))
    await post(client, chat("What is the boiling point of water at sea level?"))
    exact, _ = await post(client, chat("What is the boiling point of water at sea level?"))
    assert exact.headers["x-kvroute-cache-kind"] == "exact"
    sem, _ = await post(client, chat("what is the boiling point of water at sea level"))
    assert sem.headers["x-kvroute-cache-kind"] == "semantic"
    m = 'kvroute_cache_requests_total{kind="%s",model="tiny",result="%s"}'
    assert metric(client, m % ("exact", "hit")) == 1 and metric(client, m % ("exact", "miss")) == 2
    assert metric(client, m % ("semantic", "hit")) == 1 and metric(client, m % ("semantic", "miss")) == 1


TENANTS = [{"name": "acme", "keys": ["sk-a"]},
           {"name": "globex", "keys": ["sk-b"]}, {"name": "initech", "keys": ["sk-c"]}]


async def test_tenant_b_never_gets_tenant_a_semantic_entry_and_hits_cost_zero(aiohttp_client, worker, redis_url):
    for cache in ({"semantic": {}}, {"semantic": {}, "redis": {"url": redis_url, "prefix": "t:sem-iso", **PATIENT}}):
        cfg = config_from_dict(model_config(url(worker), cache, {"tenants": TENANTS}))
        client = await aiohttp_client(create_app(cfg, clock=ManualClock()))
        a, b, c = ({"Authorization": f"Bearer {k}"} for k in ("sk-a", "sk-b", "sk-c"))
        prompt = "Which port does PostgreSQL listen on by default?"
        await post(client, chat(prompt), a)
        before = spent(client, "acme")
        assert before > 0
        for body, key in ((chat(prompt), b), (chat(prompt.lower()), c)):  # identical, then reworded
            resp, _ = await post(client, body, key)
            assert resp.headers["x-kvroute-cache"] == "miss", cache
        hit, _ = await post(client, chat(prompt.lower()), a)
        assert hit.headers["x-kvroute-cache"] == "hit", cache
        assert spent(client, "acme") == before  # a semantic hit is charged zero tokens
        await client.close()


async def test_two_replicas_share_semantic_entries_through_redis(aiohttp_client, worker, redis_url):
    cache = {"semantic": {"sync_interval_s": 0.25}, "redis": {"url": redis_url, "prefix": "t:sem-share", **PATIENT}}
    clock_one, clock_two = ManualClock(), ManualClock()
    one = await aiohttp_client(create_app(config_from_dict(model_config(url(worker), cache)), clock=clock_one))
    two = await aiohttp_client(create_app(config_from_dict(model_config(url(worker), cache)), clock=clock_two))
    await post(one, chat("How many bytes are in a kibibyte?"))
    assert len(two.app[keys.CACHE].semantic.indexes["tiny"]) == 0
    assert await clock_two.fire() == 0.25  # replica two's next sync round
    await until_indexed(two)
    resp, raw = await post(two, chat("how many bytes are in a kibibyte"))
    assert resp.headers["x-kvroute-cache"] == "hit" and resp.headers["x-kvroute-cache-kind"] == "semantic"
    # A replica that starts later reads the whole log at start-up.
    three = await aiohttp_client(create_app(config_from_dict(model_config(url(worker), cache)), clock=ManualClock()))
    assert (await post(three, chat("How many bytes are in a KiB? (kibibyte)")))[0].headers["x-kvroute-cache"] in (
        "hit", "miss")
    assert len(three.app[keys.CACHE].semantic.indexes["tiny"]) >= 1
    await two.app[keys.CACHE].store.client.delete(*await two.app[keys.CACHE].store.client.keys("t:sem-share:*"))


async def until_indexed(client) -> None:
    from tests.clock import until

    await until(lambda: len(client.app[keys.CACHE].semantic.indexes["tiny"]) == 1)


def test_normalise_drops_case_spacing_and_closing_punctuation():
    assert normalise("  What is  the Capital of\nFrance?! ") == "what is the capital of france"
