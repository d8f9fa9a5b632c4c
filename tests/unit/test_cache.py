"""The response cache on the request path: hits, misses, bypasses, SSE replay, tenant
isolation, Redis shared by two replicas, governance accounting and metrics.

The upstream is a real aiohttp app that answers like vLLM (finish reasons, a usage chunk
on request) with an answer that depends on the prompt, and counts its calls."""

from __future__ import annotations

import orjson
import pytest
from aiohttp import web

from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from tests.clock import FakeClock
from tests.governance.conftest import PATIENT

CALLS = web.AppKey("calls", list)
PRICE = {"input_per_m": 1.0, "output_per_m": 2.0}


def echo_worker() -> web.Application:
    """A vLLM-like worker: 'answer to: <last user content>', 12 prompt and 4 completion tokens."""
    app = web.Application()
    app[CALLS] = []

    async def completion(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        app[CALLS].append(body)
        chat = "messages" in body
        text = "answer to: " + (body["messages"][-1]["content"] if chat else body["prompt"])
        usage = {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        head = {"id": f"cmpl-{len(app[CALLS])}", "created": 1700000000, "model": body["model"]}
        if not body.get("stream"):
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                      if chat else {"index": 0, "text": text, "finish_reason": "stop"})
            return web.json_response({**head, "object": "chat.completion" if chat else "text_completion",
                                      "choices": [choice], "usage": usage})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        pieces = [text[:6], text[6:], ""]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            if body.get("unfinished") and last:
                break
            choice = ({"index": 0, "delta": {"content": piece} if piece else {}} if chat
                      else {"index": 0, "text": piece})
            choice["finish_reason"] = "stop" if last else None
            await resp.write(b"data: " + orjson.dumps({**head, "object": obj, "choices": [choice]}) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(b"data: " + orjson.dumps({**head, "object": obj, "choices": [], "usage": usage})
                             + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def empty(request: web.Request) -> web.Response:
        return web.Response(text="")

    app.router.add_get("/health", empty)
    app.router.add_get("/metrics", empty)
    app.router.add_post("/v1/chat/completions", completion)
    app.router.add_post("/v1/completions", completion)
    return app


@pytest.fixture
async def worker(aiohttp_server):
    return await aiohttp_server(echo_worker())


def config(worker, top: dict | None = None, governance: dict | None = None, **model):
    raw: dict = {"models": [{"name": "tiny", "workers": [str(worker.make_url("")).rstrip("/")],
                             "policy": "round_robin", "price": PRICE, **model}],
                 "health": {"interval_s": 60}}
    if top is not None:
        raw["cache"] = top
    if governance is not None:
        raw["governance"] = governance
    return config_from_dict(raw)


async def router(aiohttp_client, cfg, clock: FakeClock | None = None):
    return await aiohttp_client(create_app(cfg, clock=clock or FakeClock()))


def chat(content: str = "What is 2+2?", **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


async def post(client, body: dict, headers: dict | None = None, path: str = "/v1/chat/completions"):
    resp = await client.post(path, json=body, headers=headers or {})
    raw = await resp.read()
    return resp, raw


def sse(raw: bytes) -> list[dict | str]:
    out: list[dict | str] = []
    for event in raw.decode().split("\n\n"):
        if event.startswith("data: "):
            data = event[6:]
            out.append("[DONE]" if data == "[DONE]" else orjson.loads(data))
    return out


def metric(client, line: str) -> float:
    for row in client.app[keys.METRICS].render().decode().splitlines():
        if row.startswith(line + " "):
            return float(row.rsplit(" ", 1)[1])
    return 0.0


async def test_a_repeated_deterministic_request_reaches_the_worker_once(aiohttp_client, worker):
    client = await router(aiohttp_client, config(worker, {"exact": {}}))
    first, raw1 = await post(client, chat())
    second, raw2 = await post(client, chat())
    assert (first.status, second.status) == (200, 200)
    assert first.headers["x-kvroute-cache"] == "miss" and second.headers["x-kvroute-cache"] == "hit"
    assert len(worker.app[CALLS]) == 1
    a, b = orjson.loads(raw1), orjson.loads(raw2)
    assert b["choices"] == a["choices"] and b["id"] == a["id"]
    assert b["usage"]["prompt_tokens"] == 12 and b["usage"]["prompt_tokens_details"]["cached_tokens"] == 12
    assert a["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # the miss is the worker's own answer
    m = 'kvroute_cache_requests_total{kind="exact",model="tiny",result="%s"}'
    assert metric(client, m % "hit") == 1 and metric(client, m % "miss") == 1
    assert metric(client, 'kvroute_cache_saved_tokens_total{kind="exact",model="tiny"}') == 16
    assert metric(client, 'kvroute_cache_saved_usd_total{kind="exact",model="tiny"}') == pytest.approx(20e-6)
    assert metric(client, 'kvroute_cache_entries{store="memory"}') == 1
    assert metric(client, 'kvroute_cache_bytes{store="memory"}') > 100


async def test_a_streamed_miss_is_stored_and_replays_to_both_kinds_of_client(aiohttp_client, worker):
    client = await router(aiohttp_client, config(worker, {"exact": {}}))
    miss, raw = await post(client, chat(stream=True))
    assert miss.headers["x-kvroute-cache"] == "miss"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in sse(raw)[:-1] if c["choices"])
    assert streamed == "answer to: What is 2+2?"

    whole, raw = await post(client, chat())
    assert whole.headers["x-kvroute-cache"] == "hit"
    body = orjson.loads(raw)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": streamed},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 12

    hit, raw = await post(client, chat(stream=True, stream_options={"include_usage": True}))
    assert hit.headers["x-kvroute-cache"] == "hit" and hit.headers["content-type"] == "text/event-stream"
    events = sse(raw)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if isinstance(e, dict)]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == streamed
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [None, "stop"]
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 12
    assert len(worker.app[CALLS]) == 1

    hit, raw = await post(client, chat(stream=True))  # no include_usage: no usage chunk
    assert all(isinstance(e, str) or e["choices"] for e in sse(raw))


async def test_completions_are_cached_and_replayed_as_text_completion_chunks(aiohttp_client, worker):
    client = await router(aiohttp_client, config(worker, {"exact": {}}))
    body = {"model": "tiny", "prompt": "Once upon", "temperature": 0}
    await post(client, body, path="/v1/completions")
    hit, raw = await post(client, {**body, "stream": True}, path="/v1/completions")
    assert hit.headers["x-kvroute-cache"] == "hit"
    chunks = [e for e in sse(raw) if isinstance(e, dict)]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "answer to: Once upon"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[0]["object"] == "text_completion"
    assert len(worker.app[CALLS]) == 1


async def test_only_deterministic_requests_are_cached_unless_the_client_opts_in(aiohttp_client, worker):
    client = await router(aiohttp_client, config(worker, {"exact": {}}))
    for body in (chat(temperature=0.7), chat(temperature=0, n=2), {k: v for k, v in chat().items()
                                                                    if k != "temperature"}):
        for _ in range(2):
            resp, _ = await post(client, body)
            assert resp.headers["x-kvroute-cache"] == "bypass"
    assert len(worker.app[CALLS]) == 6
    seeded = chat(temperature=0.9, seed=7)
    await post(client, seeded)
    assert (await post(client, seeded))[0].headers["x-kvroute-cache"] == "hit"
    opted = chat(temperature=0.7, content="opt in")
    await post(client, opted, {"x-kvroute-cache": "use"})
    assert (await post(client, opted, {"x-kvroute-cache": "use"}))[0].headers["x-kvroute-cache"] == "hit"
    assert (await post(client, opted))[0].headers["x-kvroute-cache"] == "bypass"  # without the opt-in


async def test_greedy_by_default_makes_a_request_without_temperature_cacheable(aiohttp_client, worker):
    client = await router(aiohttp_client, config(worker, {"exact": {"greedy_by_default": True}}))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    await post(client, body)
    assert (await post(client, body))[0].headers["x-kvroute-cache"] == "hit"
    assert (await post(client, {**body, "temperature": 0.5}))[0].headers["x-kvroute-cache"] == "bypass"


async def test_refresh_bypass_and_cache_control(aiohttp_client, worker):
    client = await router(aiohttp_client, config(worker, {"exact": {}}))
    await post(client, chat())
    cases = [({"x-kvroute-cache": "refresh"}, "miss"), ({"x-kvroute-cache": "bypass"}, "bypass"),
             ({"Cache-Control": "no-store"}, "bypass"), ({"Cache-Control": "max-age=0, no-cache"}, "miss"),
             ({}, "hit")]
    for headers, expected in cases:
        resp, _ = await post(client, chat(), headers)
        assert resp.headers["x-kvroute-cache"] == expected, headers
    assert len(worker.app[CALLS]) == 5
    # refresh stored the fresh answer (the echo worker numbers its answers)
    assert orjson.loads((await post(client, chat()))[1])["id"] == "cmpl-5"
    resp, raw = await post(client, chat(), {"x-kvroute-cache": "sometimes"})
    assert resp.status == 400 and orjson.loads(raw)["error"]["param"] == "x-kvroute-cache"


async def test_the_key_drops_stream_and_user_but_keeps_every_other_field(aiohttp_client, worker):
    client = await router(aiohttp_client, config(worker, {"exact": {}}))
    await post(client, chat(user="alice"))
    assert (await post(client, chat(user="bob", stream=True)))[0].headers["x-kvroute-cache"] == "hit"
    for changed in (chat(max_tokens=5), chat(content="What is 2+3?"), chat(stop=["\n"]),
                    {**chat(), "messages": [{"role": "system", "content": "Be terse."},
                                            {"role": "user", "content": "What is 2+2?"}]}):
        assert (await post(client, changed))[0].headers["x-kvroute-cache"] == "miss"


async def test_an_unfinished_stream_is_not_stored(aiohttp_client, worker):
    client = await router(aiohttp_client, config(worker, {"exact": {}}))
    await post(client, chat(stream=True, unfinished=True))
    assert (await post(client, chat(unfinished=True)))[0].headers["x-kvroute-cache"] == "miss"


async def test_api_keys_are_isolated_without_governance(aiohttp_client, worker):
    client = await router(aiohttp_client, config(worker, {"exact": {}}))
    await post(client, chat(), {"Authorization": "Bearer key-a"})
    assert (await post(client, chat(), {"Authorization": "Bearer key-b"}))[0].headers["x-kvroute-cache"] == "miss"
    assert (await post(client, chat()))[0].headers["x-kvroute-cache"] == "miss"  # no key: its own namespace
    assert (await post(client, chat(), {"Authorization": "Bearer key-a"}))[0].headers["x-kvroute-cache"] == "hit"


TENANTS = [{"name": "acme", "keys": ["sk-a", "sk-a2"]}, {"name": "globex", "keys": ["sk-b"]}]


async def test_tenant_b_never_gets_tenant_a_entry_memory_and_redis(aiohttp_client, worker, redis_url):
    for cache in ({"exact": {}}, {"exact": {}, "redis": {"url": redis_url, "prefix": "t:iso", **PATIENT}}):
        client = await router(aiohttp_client, config(worker, cache, {"tenants": TENANTS}))
        a, b, a2 = ({"Authorization": f"Bearer {k}"} for k in ("sk-a", "sk-b", "sk-a2"))
        first, raw_a = await post(client, chat(stream=True), a)
        resp, _ = await post(client, chat(), b)
        assert resp.headers["x-kvroute-cache"] == "miss", cache
        resp, _ = await post(client, chat(stream=True), b)
        assert resp.headers["x-kvroute-cache"] == "hit", cache  # tenant B's own entry
        assert (await post(client, chat(), a2))[0].headers["x-kvroute-cache"] == "hit"  # acme's other key
        bad, _ = await post(client, chat(), {"Authorization": "Bearer sk-nobody"})
        assert bad.status == 401  # an entry exists, but a bad key is refused before any lookup
        await client.close()


async def test_two_replicas_share_entries_through_redis(aiohttp_client, worker, redis_url):
    cache = {"exact": {"ttl_s": 60}, "redis": {"url": redis_url, "prefix": "t:share", **PATIENT}}
    one = await router(aiohttp_client, config(worker, cache))
    two = await router(aiohttp_client, config(worker, cache))
    await post(one, chat(stream=True))
    resp, raw = await post(two, chat())
    assert resp.headers["x-kvroute-cache"] == "hit"
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == "answer to: What is 2+2?"
    assert len(worker.app[CALLS]) == 1
    ttl = await two.app[keys.CACHE].store.client.pttl(  # Redis expires it on its own
        next(iter(await two.app[keys.CACHE].store.client.keys("t:share:e:*"))))
    assert 0 < ttl <= 60_000


async def test_governance_reuses_its_redis_for_the_cache(aiohttp_client, worker, redis_url):
    gov = {"tenants": TENANTS, "redis": {"url": redis_url, "prefix": "t:gov", **PATIENT}}
    cfg = config(worker, {"exact": {}}, gov)
    assert cfg.cache.redis.url == redis_url and cfg.cache.redis.prefix == "kvroute:cache"
    one = await router(aiohttp_client, cfg)
    two = await router(aiohttp_client, cfg)
    key = {"Authorization": "Bearer sk-a"}
    assert (await post(one, chat(content="shared via governance redis"), key))[0].status == 200
    assert (await post(two, chat(content="shared via governance redis"), key))[0].headers["x-kvroute-cache"] == "hit"
    await two.app[keys.CACHE].store.client.delete(*await two.app[keys.CACHE].store.client.keys("kvroute:cache:e:*"))


async def test_a_redis_that_is_down_costs_the_cache_not_the_request(aiohttp_client, worker):
    cache = {"exact": {}, "redis": {"url": "redis://127.0.0.1:1/0", "timeout_s": 0.2, "connect_timeout_s": 0.2}}
    client = await router(aiohttp_client, config(worker, cache))
    for _ in range(2):
        resp, raw = await post(client, chat())
        assert resp.status == 200 and resp.headers["x-kvroute-cache"] == "miss"
    assert metric(client, 'kvroute_cache_store_errors_total{op="get"}') >= 1
    assert len(worker.app[CALLS]) == 2


async def test_governance_charges_a_hit_nothing_but_still_admits_it(aiohttp_client, worker):
    clock = FakeClock()
    gov = {"tenants": TENANTS, "kill_switch": {"file": None}}
    client = await router(aiohttp_client, config(worker, {"exact": {}}, gov), clock)
    key = {"Authorization": "Bearer sk-a"}
    await post(client, chat(), key)
    await client.app[keys.GOVERNOR].drain()
    spent = 'kvroute_spend_tokens_total{agent="none",feature="none",kind="%s",model="tiny",tenant="acme"}'
    before = (metric(client, spent % "prompt"), metric(client, spent % "completion"))
    assert before == (12, 4)
    resp, _ = await post(client, chat(), key)
    await client.app[keys.GOVERNOR].drain()
    assert resp.headers["x-kvroute-cache"] == "hit"
    assert (metric(client, spent % "prompt"), metric(client, spent % "completion")) == before
    assert metric(client, 'kvroute_cache_saved_usd_total{kind="exact",model="tiny"}') == pytest.approx(20e-6)


async def test_governance_loop_detection_sees_hits(aiohttp_client, worker):
    gov = {"tenants": TENANTS, "loops": {"window": 3, "ratio": 0.6, "action": "halt"}}
    client = await router(aiohttp_client, config(worker, {"exact": {}}, gov))
    headers = {"Authorization": "Bearer sk-a", "x-kvroute-session": "s1"}
    statuses = [(await post(client, chat(), headers))[0].status for _ in range(4)]
    assert 429 in statuses  # the repeats were hits, and the loop detector halted the session all the same
    assert len(worker.app[CALLS]) == 1


async def test_a_model_override_turns_the_cache_off_or_changes_it(aiohttp_client, worker):
    client = await router(aiohttp_client, config(worker, {"exact": {}}, cache={"exact": False}))
    assert keys.CACHE not in client.app
    client = await router(aiohttp_client, config(worker, None, cache={"exact": {"greedy_by_default": True}}))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    await post(client, body)
    assert (await post(client, body))[0].headers["x-kvroute-cache"] == "hit"


async def test_an_answer_over_max_entry_bytes_is_not_stored(aiohttp_client, worker):
    client = await router(aiohttp_client, config(worker, {"exact": {"max_entry_bytes": 64}}))
    for stream in (False, True):
        await post(client, chat(stream=stream))
        assert (await post(client, chat()))[0].headers["x-kvroute-cache"] == "miss"


async def test_a_stream_is_stored_before_its_client_sees_the_end(aiohttp_client, worker):
    """A client that asks again the moment its stream ends must find the answer, on any
    replica: the entry is written before [DONE] is relayed, not after the response."""
    client = await router(aiohttp_client, config(worker, {"exact": {}}))
    cache = client.app[keys.CACHE]
    stored_before_done = []
    resp = await client.post("/v1/chat/completions", json=chat("stream me", stream=True))
    async for line in resp.content:
        if line.startswith(b"data: [DONE]"):
            stored_before_done.append(metric(client, 'kvroute_cache_entries{store="memory"}'))
    assert resp.headers["x-kvroute-cache"] == "miss" and cache is not None
    assert stored_before_done == [1.0]
    again, _ = await post(client, chat("stream me"))
    assert again.headers["x-kvroute-cache"] == "hit" and len(worker.app[CALLS]) == 1
