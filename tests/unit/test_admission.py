"""Admission control (server.max_in_flight, max_in_flight_per_worker, overload reject or
queue), readiness and drain, in process against the mock worker's slow streams."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiohttp.test_utils import make_mocked_request

from kvroute.benchmarks.backends.mock import fake_worker
from kvroute.router import keys
from kvroute.router.admission import Admission
from kvroute.router.app import create_app
from kvroute.router.config import ServerConfig, config_from_dict
from kvroute.router.errors import ConfigError, Overloaded, ShuttingDown
from kvroute.router.metrics import RouterMetrics
from tests.clock import ManualClock, until

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


def slow(tokens: int = 40, delay_s: float = 0.03, **extra) -> dict:
    """A stream of ``tokens`` chunks, ``delay_s`` apart, from the mock worker."""
    return {**CHAT, "stream": True, "fake_completion_tokens": tokens, "fake_chunk_delay_s": delay_s, **extra}


def url(server) -> str:
    return str(server.make_url("")).rstrip("/")


def config(workers: list[str], *, policy: str = "round_robin", **server):
    return config_from_dict({"models": [{"name": "tiny", "workers": workers, "policy": policy}],
                             "server": server, "health": {"interval_s": 60}})


@pytest.fixture
async def worker(aiohttp_server):
    return await aiohttp_server(fake_worker("a"))


@pytest.fixture
async def worker_b(aiohttp_server):
    return await aiohttp_server(fake_worker("b"))


async def router(aiohttp_client, workers, clock=None, *, policy: str = "round_robin", **server):
    return await aiohttp_client(create_app(config([url(w) for w in workers], policy=policy, **server), clock=clock))


async def open_stream(client, body: dict, headers: dict | None = None):
    """POST a stream and read its first event: from here it is in flight on the router."""
    resp = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert resp.status == 200, await resp.text()
    first = await resp.content.readuntil(b"\n\n")
    assert first.startswith(b"data: {")
    return resp


async def rest(resp) -> list[bytes]:
    """The remaining SSE events of a stream."""
    return [e for e in (await resp.read()).split(b"\n\n") if e]


def admission(client) -> Admission:
    return client.app[keys.ADMISSION]


async def metric(client, name: str) -> float:
    text = (await (await client.get("/metrics")).read()).decode()
    lines = [ln for ln in text.splitlines() if ln.startswith(name + " ") or ln.startswith(name + "{")]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


async def assert_503(resp, code: str, param: str | None = None) -> dict:
    assert resp.status == 503, await resp.text()
    assert resp.headers["retry-after"] == "1"
    err = (await resp.json())["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


# ---- configuration ---------------------------------------------------------------------


def test_defaults_change_nothing_below_real_overload() -> None:
    s = config(["http://a:1"]).server
    assert (s.max_in_flight, s.max_in_flight_per_worker, s.overload) == (4096, None, "reject")
    assert (s.max_queued, s.queue_timeout_s, s.drain_s) == (1024, 30.0, 30.0)


@pytest.mark.parametrize("server, key", [
    ({"overload": "drop"}, "server.overload"),
    ({"max_in_flight": 0}, "server.max_in_flight"),
    ({"max_in_flight_per_worker": -1}, "server.max_in_flight_per_worker"),
    ({"max_queued": 1.5}, "server.max_queued"),
    ({"queue_timeout_s": 0}, "server.queue_timeout_s"),
    ({"drain_s": "30s"}, "server.drain_s"),
])
def test_bad_admission_keys_name_the_key(server, key) -> None:
    with pytest.raises(ConfigError) as err:
        config(["http://a:1"], **server)
    assert err.value.key == key


# ---- the router bound ------------------------------------------------------------------


async def test_past_max_in_flight_reject_answers_503_and_the_admitted_finish(aiohttp_client, worker):
    client = await router(aiohttp_client, [worker], max_in_flight=2)
    streams = [await open_stream(client, slow()) for _ in range(2)]
    assert admission(client).in_flight == 2
    await assert_503(await client.post("/v1/chat/completions", json=CHAT), "overloaded", "server.max_in_flight")
    for resp in streams:
        events = await rest(resp)
        assert events[-1] == b"data: [DONE]" and len(events) == 40  # 39 more chunks and [DONE]
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
    assert await metric(client, "kvroute_admission_refused_total") == 1
    assert admission(client).in_flight == 0


async def test_queue_waits_for_a_slot(aiohttp_client, worker):
    client = await router(aiohttp_client, [worker], max_in_flight=1, overload="queue")
    first = await open_stream(client, slow(20, 0.02))
    queued = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
    await until(lambda: admission(client)._queued == 1)
    assert not queued.done()
    await rest(first)
    resp = await queued
    assert resp.status == 200 and (await resp.json())["choices"]
    text = (await (await client.get("/metrics")).read()).decode()
    assert 'kvroute_admission_queued_total{scope="router"} 1.0' in text
    assert 'kvroute_admission_queue_seconds_count{scope="router"} 1.0' in text
    assert "kvroute_queued_requests 0.0" in text


async def test_a_queued_request_past_its_deadline_gets_503(aiohttp_client, worker):
    clock = ManualClock()
    client = await router(aiohttp_client, [worker], clock, max_in_flight=1, overload="queue", queue_timeout_s=5)
    first = await open_stream(client, slow())
    queued = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
    assert await clock.fire() == 5  # the queue deadline
    err = await assert_503(await queued, "overloaded", "server.max_in_flight")
    assert "queue_timeout_s" in err["message"]
    assert len(await rest(first)) == 40  # the admitted stream is untouched
    text = (await (await client.get("/metrics")).read()).decode()
    assert 'kvroute_admission_refused_total{reason="queue_timeout"} 1.0' in text
    assert 'kvroute_admission_queue_seconds_sum{scope="router"} 5.0' in text


async def test_the_queue_is_bounded(aiohttp_client, worker):
    client = await router(aiohttp_client, [worker], max_in_flight=1, overload="queue", max_queued=1)
    first = await open_stream(client, slow())
    queued = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
    await until(lambda: admission(client)._queued == 1)
    err = await assert_503(await client.post("/v1/chat/completions", json=CHAT), "overloaded")
    assert "max_queued" in err["message"]
    await rest(first)
    assert (await queued).status == 200
    assert await metric(client, 'kvroute_admission_refused_total{reason="queue_full"}') == 1


# ---- the worker bound ------------------------------------------------------------------


async def test_a_worker_at_its_bound_is_not_offered_to_the_policy(aiohttp_client, worker, worker_b):
    # consistent_hash sends one session to one worker while its load allows: here, the bound does not.
    client = await router(aiohttp_client, [worker, worker_b], policy="consistent_hash", max_in_flight_per_worker=1)
    session = {"x-kvroute-session": "agent-7"}
    first = await open_stream(client, slow(), session)
    second = await open_stream(client, slow(), session)
    assert first.headers["x-kvroute-worker"] != second.headers["x-kvroute-worker"]
    await assert_503(await client.post("/v1/chat/completions", json=CHAT, headers=session), "overloaded",
                     "server.max_in_flight_per_worker")
    await rest(first)
    again = await client.post("/v1/chat/completions", json=CHAT, headers=session)
    assert again.status == 200 and again.headers["x-kvroute-worker"] == first.headers["x-kvroute-worker"]
    await rest(second)
    assert await metric(client, 'kvroute_admission_refused_total{reason="workers_busy"}') == 1


async def test_all_workers_at_their_bound_queue_until_one_frees(aiohttp_client, worker):
    client = await router(aiohttp_client, [worker], max_in_flight_per_worker=1, overload="queue")
    first = await open_stream(client, slow(20, 0.02))
    queued = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
    await until(lambda: admission(client)._queued == 1)
    await rest(first)
    resp = await queued
    assert resp.status == 200 and resp.headers["x-kvroute-worker"] == url(worker)
    assert await metric(client, 'kvroute_admission_queued_total{scope="worker"}') == 1
    assert client.app[keys.ROUTES].by_key["tiny"].pool.all()[0].in_flight_requests == 0


async def test_a_worker_that_joins_takes_queued_requests(aiohttp_client, worker, worker_b):
    client = await router(aiohttp_client, [worker], max_in_flight_per_worker=1, overload="queue")
    first = await open_stream(client, slow())
    queued = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
    await until(lambda: admission(client)._queued == 1)
    pool = client.app[keys.ROUTES].by_key["tiny"].pool
    pool.set_members([(url(worker), None), (url(worker_b), None)])  # what discovery does
    resp = await asyncio.wait_for(queued, 5)
    assert resp.status == 200 and resp.headers["x-kvroute-worker"] == url(worker_b)
    await rest(first)


# ---- readiness and liveness ------------------------------------------------------------


async def test_livez_and_readyz(aiohttp_client, worker):
    client = await router(aiohttp_client, [worker])
    live, ready = await client.get("/livez"), await client.get("/readyz")
    assert (live.status, ready.status) == (200, 200)
    assert (await ready.json()) == {"status": "ready"}
    for w in client.app[keys.ROUTES].by_key["tiny"].pool.all():
        w.healthy = False
    ready = await client.get("/readyz")
    assert ready.status == 503 and "healthy" in (await ready.json())["status"]
    assert (await client.get("/livez")).status == 200
    assert (await client.get("/health")).status == 200  # unchanged: degraded, still 200


# ---- drain -----------------------------------------------------------------------------


async def test_drain_refuses_new_requests_and_lets_the_in_flight_finish(aiohttp_client, worker):
    clock = ManualClock()
    client = await router(aiohttp_client, [worker], clock, drain_s=30)
    streams = [await open_stream(client, slow(20, 0.02)) for _ in range(3)]
    drain = asyncio.create_task(admission(client).drain())
    await until(lambda: admission(client).draining)
    ready = await client.get("/readyz")
    assert ready.status == 503 and (await ready.json()) == {"status": "draining"}
    assert (await client.get("/livez")).status == 200
    refused = await client.post("/v1/chat/completions", json=CHAT)
    await assert_503(refused, "shutting_down")
    assert refused.headers["connection"].lower() == "close"
    for resp in streams:
        events = await rest(resp)
        assert events[-1] == b"data: [DONE]" and len(events) == 20
    await asyncio.wait_for(drain, 5)  # idle before the grace ran out: nothing cut
    assert clock.now == ManualClock().now
    assert await metric(client, "kvroute_drain_cut_requests_total") == 0
    assert await metric(client, "kvroute_draining") == 1


async def test_a_stream_longer_than_the_grace_is_cut_with_a_final_sse_error(aiohttp_client, worker):
    clock = ManualClock()
    client = await router(aiohttp_client, [worker], clock, drain_s=2)
    resp = await open_stream(client, slow(400, 0.02))
    drain = asyncio.create_task(admission(client).drain())
    assert await clock.fire() == 2  # the grace period ends
    await asyncio.wait_for(drain, 5)
    events = await asyncio.wait_for(rest(resp), 5)
    assert len(events) < 400
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "shutting_down" and "drain_s" in last["error"]["message"]
    assert all(e.startswith(b'data: {"id"') for e in events[:-1])
    assert await metric(client, "kvroute_drain_cut_requests_total") == 1
    assert admission(client).in_flight == 0


async def test_drain_refuses_the_queued(aiohttp_client, worker):
    client = await router(aiohttp_client, [worker], max_in_flight=1, overload="queue")
    first = await open_stream(client, slow(20, 0.02))
    queued = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
    await until(lambda: admission(client)._queued == 1)
    drain = asyncio.create_task(admission(client).drain())
    await assert_503(await queued, "shutting_down")
    assert len(await rest(first)) == 20
    await asyncio.wait_for(drain, 5)


# ---- the queue's hand-over, without HTTP -----------------------------------------------


def _admission(**server) -> Admission:
    return Admission(ServerConfig(**server), RouterMetrics())


async def _hold(adm: Admission, gate: asyncio.Event) -> str:
    async def handler():
        await gate.wait()
        return "done"
    return await adm.serve(make_mocked_request("POST", "/v1/chat/completions"), handler)  # type: ignore[arg-type]


class _CancelOnHandOver(Admission):
    """Cancels ``victim`` right after a slot is handed over, before the woken waiter runs."""

    victim: asyncio.Task | None = None

    def _release_router_slot(self) -> None:
        super()._release_router_slot()
        if self.victim is not None:
            self.victim.cancel()
            self.victim = None


@pytest.mark.parametrize("handed", [False, True], ids=["cancelled-while-queued", "cancelled-once-handed"])
async def test_a_cancelled_waiter_never_keeps_a_slot(handed) -> None:
    adm = _CancelOnHandOver(ServerConfig(max_in_flight=1, overload="queue"), RouterMetrics())
    gate = asyncio.Event()
    holder = asyncio.create_task(_hold(adm, gate))
    await until(lambda: adm.in_flight == 1)
    b = asyncio.create_task(_hold(adm, gate))
    c = asyncio.create_task(_hold(adm, gate))
    await until(lambda: adm._queued == 2)
    if handed:
        adm.victim = b  # the holder's slot goes to b, then b is cancelled before it runs
    else:
        b.cancel()
        await asyncio.sleep(0)
    gate.set()
    assert await holder == "done"
    assert await asyncio.wait_for(c, 5) == "done"  # c gets the slot either way
    with pytest.raises(asyncio.CancelledError):
        await b
    assert (adm.in_flight, adm._queued) == (0, 0)


async def test_a_request_cut_before_its_answer_began_is_a_503() -> None:
    adm = _admission(drain_s=0.01)
    task = asyncio.create_task(_hold(adm, asyncio.Event()))
    await until(lambda: adm.in_flight == 1)
    await adm.drain()
    with pytest.raises(ShuttingDown):
        await task
    with pytest.raises(ShuttingDown):
        await _hold(adm, asyncio.Event())


async def test_reject_refuses_at_once() -> None:
    adm = _admission(max_in_flight=1)
    gate = asyncio.Event()
    holder = asyncio.create_task(_hold(adm, gate))
    await until(lambda: adm.in_flight == 1)
    with pytest.raises(Overloaded):
        await _hold(adm, gate)
    gate.set()
    await holder
    assert adm.in_flight == 0
