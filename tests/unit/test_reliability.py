"""Timeouts, retries, circuit breakers and the stream error boundary, end to end through the
router against mock vLLM workers with faults (benchmarks/backends/mock.py, ``FAULTS``).

Backoff and cooldowns run on a FakeClock. The timeouts are real but short (0.2 s): they race
a real socket, and a stalled mock worker stops stalling as soon as the router hangs up.
"""

from __future__ import annotations

import orjson
import pytest

from kvroute.benchmarks.backends.mock import FAULTS, SEEN, fake_worker
from kvroute.router import keys, proxy
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from kvroute.router.prefix import chain_keys
from tests.clock import FakeClock

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
STREAM = {**CHAT, "stream": True}


def url_of(server) -> str:
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
async def pair(aiohttp_server):
    """Two mock workers, in the order round_robin tries them (by URL): faults go on the first."""
    servers = sorted([await aiohttp_server(fake_worker(n)) for n in ("a", "b")], key=url_of)
    return servers


async def router(aiohttp_client, servers, clock=None, *, server=None, **sections):
    model = {"name": "tiny", "workers": [url_of(s) for s in servers], "policy": "round_robin"}
    if "timeouts" in sections:
        model["timeouts"] = sections.pop("timeouts")
    cfg = config_from_dict({"models": [model], "health": {"interval_s": 60}, "server": server or {}, **sections})
    return await aiohttp_client(create_app(cfg, clock=clock or FakeClock()))


def sse(text: str) -> list[dict | str]:
    out: list[dict | str] = []
    for event in text.split("\n\n"):
        if event.startswith("data: "):
            data = event[6:]
            out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


def metric(client, name: str, **labels) -> float:
    value = client.server.app[keys.METRICS].registry.get_sample_value(name, labels)
    return value or 0.0


def pool_of(client):
    return client.server.app[keys.ROUTES].get("tiny").tiers[0].pool


@pytest.mark.parametrize("fault", [{"stall_s": 30}, {"stall_first_event_s": 30}],
                         ids=["before-headers", "before-first-event"])
async def test_a_stream_stalled_before_its_first_byte_goes_to_another_worker(aiohttp_client, pair, fault):
    stuck, good = pair
    stuck.app[FAULTS].update(fault)
    client = await router(aiohttp_client, pair, timeouts={"first_byte_s": 0.2})
    resp = await client.post("/v1/chat/completions", json=STREAM)
    assert resp.status == 200 and resp.headers["x-kvroute-worker"] == url_of(good)
    assert "hi" in await resp.text()
    assert len(stuck.app[SEEN]) == 1 and metric(client, "kvroute_retries_total", model="tiny") == 1
    assert pool_of(client).get(url_of(stuck)).breaker.failures == 1  # a stall counts against it
    assert pool_of(client).get(url_of(stuck)).healthy  # but does not eject it


async def test_a_stream_stalled_after_its_first_byte_ends_with_an_sse_error_and_is_accounted(aiohttp_client, pair):
    stuck = pair[0]
    stuck.app[FAULTS].update(stall_after_events=1, stall_mid_s=30)
    client = await router(aiohttp_client, pair, timeouts={"idle_s": 0.2})
    resp = await client.post("/v1/chat/completions", json=STREAM)
    events = sse(await resp.text())
    assert resp.status == 200 and resp.headers["x-kvroute-worker"] == url_of(stuck)
    assert events[0]["choices"][0]["delta"]["content"] == "hi"
    assert events[-1]["error"]["code"] == "upstream_timeout" and "idle_s" in events[-1]["error"]["message"]
    assert len(events) == 2  # never retried once the client had a byte
    assert metric(client, "kvroute_worker_requests_total", model="tiny", worker=url_of(stuck),
                  status="upstream_timeout") == 1
    assert metric(client, "kvroute_retries_total", model="tiny") == 0
    assert pool_of(client).get(url_of(stuck)).breaker.failures == 1


async def test_non_streaming_answers_are_bounded_by_the_request_timeout_only(aiohttp_client, pair):
    slow = pair[0]
    slow.app[FAULTS].update(stall_s=0.3)  # longer than first_byte_s: a long generation, not a stall
    client = await router(aiohttp_client, pair, timeouts={"first_byte_s": 0.1})
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200 and resp.headers["x-kvroute-worker"] == url_of(slow)

    slow.app[FAULTS].update(stall_s=30)
    client = await router(aiohttp_client, pair, server={"request_timeout_s": 0.2}, timeouts={"first_byte_s": 0.1})
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 504 and (await resp.json())["error"]["code"] == "upstream_timeout"
    assert pair[1].app[SEEN] == []  # the deadline is spent: no time for another worker


async def test_a_700_kb_delta_passes_through_intact(aiohttp_client, pair):
    pair[0].app[FAULTS].update(delta_bytes=700_000)  # over aiohttp's 512 KiB line limit
    client = await router(aiohttp_client, pair)
    resp = await client.post("/v1/chat/completions", json=STREAM)
    events = sse(await resp.text())
    assert resp.status == 200 and events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["content"] == "x" * 700_000
    assert metric(client, "kvroute_worker_requests_total", model="tiny", worker=url_of(pair[0]), status="ok") == 1


async def test_an_event_over_the_limit_is_a_bad_response(aiohttp_client, pair, monkeypatch):
    monkeypatch.setattr(proxy, "MAX_EVENT_BYTES", 10_000)
    first, second = pair
    first.app[FAULTS].update(event_bytes_after=20_000)  # after the first byte: the stream ends cleanly
    client = await router(aiohttp_client, pair)
    resp = await client.post("/v1/chat/completions", json=STREAM)
    events = sse(await resp.text())
    assert events[0]["choices"][0]["delta"]["content"] == "hi"
    assert events[-1]["error"]["code"] == "upstream_error" and "SSE event over" in events[-1]["error"]["message"]
    assert metric(client, "kvroute_worker_requests_total", model="tiny", worker=url_of(first),
                  status="upstream_error") == 1

    first.app[FAULTS].clear()
    second.app[FAULTS].update(delta_bytes=20_000)  # before the first byte: a 502, not retried
    resp = await client.post("/v1/chat/completions", json=STREAM)  # round robin: the second worker
    assert resp.status == 502 and (await resp.json())["error"]["code"] == "upstream_error"
    assert len(first.app[SEEN]) == 1 and metric(client, "kvroute_retries_total", model="tiny") == 0


@pytest.mark.parametrize("status, counts_against_it", [(503, 1), (429, 0)])
async def test_an_overloaded_worker_is_retried_elsewhere_after_its_short_retry_after(
        aiohttp_client, pair, status, counts_against_it):
    busy, good = pair
    busy.app[FAULTS].update(status=status, retry_after="1")
    clock = FakeClock()
    client = await router(aiohttp_client, pair, clock)
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200 and resp.headers["x-kvroute-worker"] == url_of(good)
    assert clock.slept == [1.0]  # Retry-After as the least wait, on the injected clock
    assert pool_of(client).get(url_of(busy)).breaker.failures == counts_against_it


async def test_a_long_retry_after_goes_to_the_client_with_the_workers_status(aiohttp_client, pair):
    busy, other = pair
    busy.app[FAULTS].update(status=503, retry_after="30")
    client = await router(aiohttp_client, pair)
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 503 and resp.headers["retry-after"] == "30"
    assert (await resp.json())["message"] == "fault: HTTP 503"  # the worker's own body
    assert other.app[SEEN] == []
    assert metric(client, "kvroute_retries_refused_total", model="tiny", reason="retry_after") == 1


async def test_5xx_goes_to_another_worker_and_other_4xx_never(aiohttp_client, pair):
    first, second = pair
    first.app[FAULTS].update(status=500)
    clock = FakeClock()
    client = await router(aiohttp_client, pair, clock)
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200 and resp.headers["x-kvroute-worker"] == url_of(second)
    assert len(clock.slept) == 1 and 0 <= clock.slept[0] <= 0.025  # backoff with jitter
    first.app[FAULTS].clear()
    resp = await client.post("/v1/chat/completions", json={**CHAT, "temperature": 99})
    assert resp.status == 400
    assert len(first.app[SEEN]) + len(second.app[SEEN]) == 3  # the 400 was tried once


async def test_the_retry_budget_refuses_retries_and_counts_them(aiohttp_client, pair):
    pair[0].app[FAULTS].update(status=500)
    client = await router(aiohttp_client, pair, retries={"budget_ratio": 0, "min_retries_per_s": 0})
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 500 and pair[1].app[SEEN] == []
    assert metric(client, "kvroute_retries_refused_total", model="tiny", reason="budget") == 1


async def test_a_spent_retry_budget_still_moves_requests_off_a_worker_that_is_gone(aiohttp_client, pair):
    client = await router(aiohttp_client, pair, retries={"budget_ratio": 0, "min_retries_per_s": 0})
    for server in pair:  # round robin: one each, so the next request goes to the first
        assert (await client.post("/v1/chat/completions", json=CHAT)).headers["x-kvroute-worker"] == url_of(server)
    gone = url_of(pair[0])
    await pair[0].close()  # drops its connections and refuses new ones, as a crashed worker does
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200 and resp.headers["x-kvroute-worker"] == url_of(pair[1])
    assert metric(client, "kvroute_retries_total", model="tiny") >= 1
    assert metric(client, "kvroute_retries_refused_total", model="tiny", reason="budget") == 0
    assert gone not in {w.url for w in pool_of(client).healthy()}  # ejected: later requests go straight to the live one


async def test_max_attempts_bounds_the_tries(aiohttp_client, aiohttp_server):
    servers = [await aiohttp_server(fake_worker(n)) for n in ("a", "b", "c")]
    for s in servers:
        s.app[FAULTS].update(status=502)
    client = await router(aiohttp_client, servers, retries={"max_attempts": 2})
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 502
    assert sum(len(s.app[SEEN]) for s in servers) == 2
    assert metric(client, "kvroute_retries_refused_total", model="tiny", reason="attempts") == 1


async def test_a_failing_worker_opens_its_breaker_and_is_probed_after_the_cooldown(aiohttp_client, pair):
    bad, good = pair
    bad.app[FAULTS].update(status=500)
    clock = FakeClock()
    client = await router(aiohttp_client, pair, clock, breaker={"failures": 2, "cooldown_s": 10})
    route = client.server.app[keys.ROUTES].get("tiny").tiers[0]
    route.index.insert(url_of(bad), chain_keys(list(range(64)), 16))
    blocks = route.index.blocks_of(url_of(bad))

    async def worker_health() -> dict:
        health = await (await client.get("/health")).json()
        return {w["url"]: w for w in health["models"]["tiny"]["workers"]}

    def state() -> float:
        return metric(client, "kvroute_worker_breaker_state", model="tiny", worker=url_of(bad))

    async def send(n: int) -> None:
        for _ in range(n):
            resp = await client.post("/v1/chat/completions", json=CHAT)
            assert resp.status == 200 and resp.headers["x-kvroute-worker"] == url_of(good)

    await send(2)  # round robin sends each to the bad worker first; both are retried
    assert len(bad.app[SEEN]) == 2 and state() == 2
    health = await worker_health()
    assert health[url_of(bad)]["breaker"] == "open" and health[url_of(bad)]["healthy"]
    assert health[url_of(good)]["breaker"] == "closed"
    await send(4)
    assert len(bad.app[SEEN]) == 2  # open: no traffic
    assert route.index.blocks_of(url_of(bad)) == blocks  # and not ejected: the index is kept

    clock.advance(10)
    await send(2)  # half-open: one of these is the probe, it fails, the breaker opens again
    assert len(bad.app[SEEN]) == 3 and state() == 2

    bad.app[FAULTS].clear()
    clock.advance(10)
    served = set()
    for _ in range(2):
        resp = await client.post("/v1/chat/completions", json=CHAT)
        served.add(resp.headers["x-kvroute-worker"])
    assert url_of(bad) in served and state() == 0  # the probe succeeded: closed
    assert (await worker_health())[url_of(bad)]["breaker"] == "closed"
    assert route.index.blocks_of(url_of(bad)) == blocks


async def test_the_routers_own_failure_mid_stream_also_ends_it_cleanly(aiohttp_client, pair, monkeypatch):
    events_seen = []
    keep = proxy._keep_event

    def failing_keep(data: bytes, d) -> bool:
        events_seen.append(data)
        if len(events_seen) == 2:
            raise ValueError("a bug in the relay")
        return keep(data, d)

    monkeypatch.setattr(proxy, "_keep_event", failing_keep)
    client = await router(aiohttp_client, pair)
    resp = await client.post("/v1/chat/completions", json=STREAM)
    events = sse(await resp.text())
    assert resp.status == 200 and events[0]["choices"][0]["delta"]["content"] == "hi"
    assert events[-1]["error"]["message"] == "Internal router error" and len(events) == 2
    worker = url_of(pair[0])
    assert metric(client, "kvroute_worker_requests_total", model="tiny", worker=worker, status="internal_error") == 1
    assert pool_of(client).get(worker).breaker.failures == 0  # not the worker's fault
