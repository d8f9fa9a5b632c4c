"""A client that hangs up: the router closes the worker's request at once, so vLLM stops a
generation nobody will read, for whole answers as for streams. Served by ``router/server.py``'s
runner, as ``kvroute serve`` serves the app."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import orjson
import pytest
from aiohttp import web

from kvroute.benchmarks.backends.mock import bare_worker
from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from tests.clock import until
from tests.unit.test_bad_input import RouterServer

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
KEY = "sk-acme"


def slow_worker(hung_up: asyncio.Event) -> web.Application:
    """A worker that starts a long answer (a stream's first event) and then waits, up to
    10 s, for its caller to hang up."""

    async def chat(request: web.Request) -> web.StreamResponse:
        resp: web.StreamResponse | None = None
        if (await request.json()).get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        try:
            for _ in range(200):
                if request.transport is None or request.transport.is_closing():
                    hung_up.set()
                    return resp or web.Response()
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:  # aiohttp's test server cancels a handler whose client left
            hung_up.set()
            raise
        return resp or web.json_response({"choices": []})

    return bare_worker(chat)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_hangs_up_closes_the_workers_request(aiohttp_server, stream, tmp_path):
    hung_up = asyncio.Event()
    worker = await aiohttp_server(slow_worker(hung_up))
    url = str(worker.make_url("")).rstrip("/")
    router = RouterServer(create_app(config_from_dict({
        "models": [{"name": "tiny", "workers": [url], "policy": "round_robin"}],
        "health": {"interval_s": 60, "timeout_s": 10}, "scrape": {"timeout_s": 10},
        "governance": {"tenants": [{"name": "acme", "keys": [KEY]}]},
        "telemetry": {"access_log": {"enabled": True, "file": {"path": str(tmp_path / "access.jsonl")}}}})))
    auth = {"Authorization": f"Bearer {KEY}"}
    await router.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            with contextlib.suppress(TimeoutError):
                async with session.post(router.make_url("/v1/chat/completions"), json={**CHAT, "stream": stream},
                                        headers=auth, timeout=aiohttp.ClientTimeout(total=0.5)) as resp:
                    # a whole answer sends no headers before it, so only a stream gets here
                    assert stream and resp.status == 200, (resp.status, await resp.text())
                    assert (await resp.content.readline()).startswith(b"data: ")  # the first event came
                    await resp.content.read()  # the worker sends no more; the client gives up
        await asyncio.wait_for(hung_up.wait(), 5)  # not 10 s on: the router closed the call
        registry = router.app[keys.METRICS].registry
        labels = {"model": "tiny", "worker": url}
        await until(lambda: registry.get_sample_value(
            "kvroute_worker_requests_total", {**labels, "status": "client_disconnected"}) == 1)
        assert registry.get_sample_value("kvroute_worker_in_flight_requests", labels) == 0
        # No usage came back, so the prompt is charged as a floor: hanging up is not free.
        await router.app[keys.GOVERNOR].drain()
        async with aiohttp.ClientSession() as session, \
                session.get(router.make_url("/v1/kvroute/spend"), headers=auth) as resp:
            spend = (await resp.json())["data"]
        assert [r["requests"] for r in spend] == [1] and spend[0]["prompt_tokens"] > 0
        router.app[keys.TELEMETRY].close()
        (line,) = [e for e in map(orjson.loads, (tmp_path / "access.jsonl").read_text().splitlines())
                   if e["path"] == "/v1/chat/completions"]
        assert (line["status"], line["error"]) == ((200, "client_disconnected") if stream else
                                                   (499, "client_disconnected"))
    finally:
        await router.close()
