"""The ``cache:`` section, a model's override, and the pure parts of the cache: the request
policy and key, the in-process LRU, and rebuilding a streamed answer."""

from __future__ import annotations

import orjson
import pytest

from kvroute.router.cache import replay
from kvroute.router.cache.config import DEFAULT_PREFIX, ExactCacheConfig
from kvroute.router.cache.policy import Mode, cache_key, decide
from kvroute.router.cache.store import MemoryStore
from kvroute.router.config import config_from_dict
from kvroute.router.errors import ConfigError, InvalidRequest
from kvroute.router.requests import CHAT, COMPLETION, parse_request
from tests.clock import FakeClock


def cfg(top=None, governance=None, **model):
    raw: dict = {"models": [{"name": "m", "workers": ["http://w:8000"], **model}]}
    if top is not None:
        raw["cache"] = top
    if governance is not None:
        raw["governance"] = governance
    return config_from_dict(raw)


def test_no_cache_section_means_no_cache():
    c = cfg()
    assert c.cache is None and c.models[0].cache.exact is None


def test_an_empty_exact_turns_it_on_with_defaults_and_a_model_overrides_fields():
    c = cfg({"exact": {}})
    assert c.models[0].cache.exact == ExactCacheConfig()
    assert c.cache.store == "auto" and c.cache.redis is None and c.cache.max_bytes == 256 * 2**20
    c = cfg({"exact": {"ttl_s": 60, "max_entry_bytes": 100}}, cache={"exact": {"greedy_by_default": True}})
    assert c.models[0].cache.exact == ExactCacheConfig(ttl_s=60, max_entry_bytes=100, greedy_by_default=True)
    assert cfg({"exact": {}}, cache={"exact": False}).models[0].cache.exact is None
    only_model = cfg(cache={"exact": {}})  # no top-level section: the model alone turns it on
    assert only_model.models[0].cache.exact == ExactCacheConfig() and only_model.cache.store == "auto"


def test_a_tiered_model_takes_cache_at_model_level():
    tiers = [{"name": "s", "workers": ["http://w:1"]}, {"name": "l", "workers": ["http://w:2"]}]
    c = config_from_dict({"models": [{"name": "m", "tiers": tiers, "classifier": {"thresholds": [0.5]},
                                      "cache": {"exact": {"ttl_s": 5}}}]})
    assert c.models[0].cache.exact.ttl_s == 5
    with pytest.raises(ConfigError, match=r"models\[0\]\.tiers\[0\]\.cache"):
        config_from_dict({"models": [{"name": "m", "tiers": [{**tiers[0], "cache": {}}, tiers[1]]}]})


def test_redis_comes_from_the_cache_or_from_governance():
    c = cfg({"exact": {}, "redis": {"url": "redis://r:6379/1", "timeout_s": 0.2}})
    assert (c.cache.redis.url, c.cache.redis.prefix, c.cache.redis.timeout_s) == ("redis://r:6379/1", DEFAULT_PREFIX,
                                                                                    0.2)
    gov = {"redis": {"url": "redis://g:6379/0", "prefix": "gov"}}
    c = cfg({"exact": {}}, gov)
    assert (c.cache.redis.url, c.cache.redis.prefix) == ("redis://g:6379/0", DEFAULT_PREFIX)
    assert cfg({"exact": {}, "store": "memory"}, gov).cache.redis is None


@pytest.mark.parametrize(("cache", "model", "key"), [
    ({"exact": {"ttl": 1}}, None, "cache.exact.ttl"),
    ({"exact": {"ttl_s": 0}}, None, "cache.exact.ttl_s"),
    ({"exact": {"max_entry_bytes": "big"}}, None, "cache.exact.max_entry_bytes"),
    ({"exact": {"greedy_by_default": 1}}, None, "cache.exact.greedy_by_default"),
    ({"store": "disk"}, None, "cache.store"),
    ({"store": "redis"}, None, "cache.store"),
    ({"redis": {"url": "http://r"}}, None, "cache.redis.url"),
    ({"redis": {}}, None, "cache.redis.url"),
    ({"max_bytes": -1}, None, "cache.max_bytes"),
    ({"semantics": {}}, None, "cache.semantics"),
    (None, {"exact": {"ttl_s": -5}}, "models[0].cache.exact.ttl_s"),
    (None, {"exactly": {}}, "models[0].cache.exactly"),
    (None, "yes", "models[0].cache"),
])
def test_bad_cache_config_names_the_key(cache, model, key):
    with pytest.raises(ConfigError) as err:
        cfg(cache, **({"cache": model} if model is not None else {}))
    assert err.value.key == key


def parsed(body: dict, headers: dict | None = None, kind: str = CHAT):
    return parse_request(kind, orjson.dumps(body), headers or {})


CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("extra", "headers", "cache_control", "mode"), [
    ({"temperature": 0}, {}, None, Mode.USE),
    ({"temperature": 0.0, "n": 1}, {}, None, Mode.USE),
    ({"temperature": 1, "seed": 3}, {}, None, Mode.USE),
    ({"temperature": 0, "n": 3}, {}, None, Mode.BYPASS),
    ({"temperature": 0.2}, {}, None, Mode.BYPASS),
    ({}, {}, None, Mode.BYPASS),
    ({"temperature": 0.2}, {"x-kvroute-cache": "use"}, None, Mode.USE),
    ({"temperature": 0.2}, {"x-kvroute-cache": "Refresh"}, None, Mode.REFRESH),
    ({"temperature": 0}, {"x-kvroute-cache": "bypass"}, None, Mode.BYPASS),
    ({"temperature": 0}, {}, "no-store", Mode.BYPASS),
    ({"temperature": 0}, {"x-kvroute-cache": "use"}, "private, no-store", Mode.BYPASS),
    ({"temperature": 0}, {}, "no-cache", Mode.REFRESH),
    ({"temperature": 0}, {}, "max-age=60", Mode.USE),
])
def test_decide(extra, headers, cache_control, mode):
    assert decide(parsed({**CHAT_BODY, **extra}, headers), cache_control, ExactCacheConfig()) is mode


def test_greedy_by_default_and_a_bad_header():
    assert decide(parsed(CHAT_BODY), None, ExactCacheConfig(greedy_by_default=True)) is Mode.USE
    with pytest.raises(InvalidRequest) as err:
        decide(parsed(CHAT_BODY, {"x-kvroute-cache": "always"}), None, ExactCacheConfig())
    assert err.value.param == "x-kvroute-cache"


def test_the_key_is_canonical_and_separates_namespace_model_and_tier():
    a = {"model": "m", "temperature": 0, "messages": [{"content": "hi", "role": "user"}]}
    b = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "user": "u", "temperature": 0,
         "stream_options": {"include_usage": True}, "model": "m"}
    assert cache_key("t", "m", None, a) == cache_key("t", "m", None, b)
    assert cache_key("t", "m", None, a) != cache_key("u", "m", None, a)
    assert cache_key("t", "m", None, a) != cache_key("t", "m", "large", a)
    assert cache_key("ab", "c", None, a) != cache_key("a", "bc", None, a)
    assert cache_key("t", "m", None, a) != cache_key("t", "m", None, {**a, "temperature": 0.0001})


async def test_the_memory_store_is_an_lru_bounded_in_bytes_with_a_ttl():
    clock = FakeClock()
    store = MemoryStore(max_bytes=3 * (64 + 1 + 100), clock=clock)
    for k in "abc":
        await store.set(k, b"x" * 100, ttl_s=10)
    assert len(store) == 3 and store.size == 3 * 165
    assert await store.get("a") == b"x" * 100  # a is now the most recently used
    await store.set("d", b"y" * 100, ttl_s=10)
    assert await store.get("b") is None and await store.get("a") is not None and len(store) == 3
    await store.set("huge", b"z" * 1000, ttl_s=10)  # larger than the whole store: not stored
    assert await store.get("huge") is None and len(store) == 3
    clock.advance(10)
    assert await store.get("a") is None and len(store) == 2  # expired
    await store.set("c", b"short", ttl_s=1)  # replacing an entry frees its old bytes
    assert store.size == 165 + (64 + 1 + 5)


def stream_events(chunks: list[dict]) -> list[bytes]:
    return [b"data: " + orjson.dumps(c) + b"\n" for c in chunks] + [b"data: [DONE]\n"]


def test_a_streamed_chat_answer_with_tool_calls_is_rebuilt():
    head = {"id": "c1", "created": 5, "model": "m", "object": "chat.completion.chunk"}
    chunks = [
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "look", "arguments": '{"q":'}}]},
            "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]},
                              "finish_reason": "tool_calls"}]},
    ]
    usage = {"prompt_tokens": 9, "completion_tokens": 5}
    body = replay.assemble(CHAT, stream_events(chunks), usage)
    assert body["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "look", "arguments": '{"q":"x"}'}}]}}]
    entry = replay.Entry(CHAT, body, None, 0.0)
    events = [orjson.loads(e[6:]) for e in replay.sse_events(entry, include_usage=True)[:-1]]
    assert events[0]["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    assert events[-1]["usage"] == {"prompt_tokens": 9, "completion_tokens": 5,
                                   "prompt_tokens_details": {"cached_tokens": 9}}
    assert replay.Entry.decode(entry.encode()) == entry


def test_streams_that_cannot_be_rebuilt_exactly_are_not_stored():
    head = {"id": "c1", "object": "text_completion"}
    finished = {**head, "choices": [{"index": 0, "text": "a", "finish_reason": "stop"}]}
    assert replay.assemble(COMPLETION, stream_events([finished]), None)["choices"][0]["text"] == "a"
    with_logprobs = {**head, "choices": [{"index": 0, "text": "a", "logprobs": {"tokens": ["a"]},
                                          "finish_reason": "stop"}]}
    assert replay.assemble(COMPLETION, stream_events([with_logprobs]), None) is None
    unfinished = {**head, "choices": [{"index": 0, "text": "a", "finish_reason": None}]}
    assert replay.assemble(COMPLETION, stream_events([unfinished]), None) is None
    assert replay.assemble(COMPLETION, [b"data: {not json\n"], None) is None
    assert replay.Entry.decode(b"junk") is None and replay.Entry.decode(b'{"v": 99}') is None
