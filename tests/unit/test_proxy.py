"""The router's HTTP surface against a fake worker: bad input, streaming, retries, metrics."""

from __future__ import annotations

import contextlib
import gc
import json

import aiohttp
import orjson
import pytest
from aiohttp import web

from kvroute.benchmarks.backends.mock import SEEN, SEEN_HEADERS, bare_worker, fake_worker
from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from tests.clock import until

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


@pytest.fixture
async def upstream(aiohttp_server):
    return await aiohttp_server(fake_worker())


def router_config(workers, **server):
    return config_from_dict({
        "models": [{"name": "tiny", "workers": workers, "policy": "round_robin"}],
        "server": {"max_body_bytes": 4096, **server},
        "health": {"interval_s": 60},
    })


@pytest.fixture
async def client(aiohttp_client, upstream):
    return await aiohttp_client(create_app(router_config([str(upstream.make_url("")).rstrip("/")])))


def assert_openai_error(body: dict, status_code: str | None = None) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if status_code:
        assert err["code"] == status_code


async def test_non_streaming_chat_is_passed_through_with_the_worker_header(client, upstream):
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200
    body = await resp.json()
    assert body["choices"][0]["message"]["content"] == "hi from fake"
    assert resp.headers["x-kvroute-worker"] == str(upstream.make_url("")).rstrip("/")


async def test_the_response_says_how_many_prompt_tokens_the_router_expected_cached(client):
    long = {**CHAT, "messages": [{"role": "user", "content": "the same long question " * 100}]}
    first = await client.post("/v1/chat/completions", json=long)
    again = await client.post("/v1/chat/completions", json=long)
    assert first.headers["x-kvroute-predicted-cached-tokens"] == "0"
    assert int(again.headers["x-kvroute-predicted-cached-tokens"]) > 0  # the prefix index saw it


async def test_stream_strips_the_usage_chunk_unless_asked_and_counts_it(client, upstream):
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    text = (await resp.read()).decode()
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and len(events) == 4
    assert '"usage"' not in text
    assert upstream.app[SEEN][-1]["stream_options"] == {"include_usage": True}
    metrics = (await (await client.get("/metrics")).read()).decode()
    assert 'kvroute_worker_prompt_tokens_total{model="tiny"' in metrics
    assert "} 11.0" in metrics

    resp = await client.post("/v1/chat/completions",
                             json={**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert '"usage"' in (await resp.read()).decode()


@pytest.mark.parametrize("leaves_at", ["end", "event"])
async def test_a_client_that_hangs_up_at_the_end_of_a_stream_had_its_answer(client, monkeypatch, leaves_at):
    """The openai client closes the connection at [DONE], before the chunked body's last
    bytes; ending the response can then fail. The answer was delivered: it counts as ok.
    A client gone before an event did not get its answer."""
    registry = client.server.app[keys.METRICS].registry
    url = next(iter(client.server.app[keys.ROUTES].get("tiny").tiers[0].pool.all())).url
    sent = []
    write_, write_eof_ = web.StreamResponse.write, web.StreamResponse.write_eof
    router = client.server.app

    async def write(self, data):
        if self._req.app is not router:  # the mock worker's own response
            return await write_(self, data)
        sent.append(data)
        if leaves_at == "event" and len(sent) == 2:
            raise ConnectionResetError("client gone")
        return await write_(self, data)

    async def write_eof(self, data=b""):
        if self._req.app is not router:
            return await write_eof_(self, data)
        raise ConnectionResetError("client gone")

    monkeypatch.setattr(web.StreamResponse, "write", write)
    monkeypatch.setattr(web.StreamResponse, "write_eof", write_eof)
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    with contextlib.suppress(aiohttp.ClientPayloadError):  # the body never ends: the "client" left
        await resp.read()
    status = "ok" if leaves_at == "end" else "client_disconnected"
    await until(lambda: registry.get_sample_value("kvroute_worker_requests_total",
                                                  {"model": "tiny", "worker": url, "status": status}) == 1)
    if leaves_at == "end":
        assert sent[-1] == b"data: [DONE]\n\n"
        assert registry.get_sample_value("kvroute_router_added_seconds_count", {"model": "tiny"}) == 1


async def test_cached_tokens_and_completions_are_accounted(client):
    await client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 3})
    metrics = (await (await client.get("/metrics")).read()).decode()
    line = next(ln for ln in metrics.splitlines() if ln.startswith("kvroute_worker_cached_prompt_tokens_total{"))
    assert line.endswith(" 5.0")


@pytest.mark.parametrize("payload, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (orjson.dumps({"messages": [{"role": "user", "content": "x"}]}), 400, "model"),
    (orjson.dumps({"model": "tiny"}), 400, "messages"),
    (orjson.dumps({"model": "tiny", "messages": "hello"}), 400, "messages"),
    (orjson.dumps({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}), 400,
     "messages[0].role"),
    (orjson.dumps({"model": "tiny", "messages": [{"role": "user", "content": 5}]}), 400,
     "messages[0].content"),
    (orjson.dumps({**CHAT, "max_tokens": "many"}), 400, "max_tokens"),
    (orjson.dumps({**CHAT, "max_tokens": 0}), 400, "max_tokens"),
    (orjson.dumps({**CHAT, "stream": "yes"}), 400, "stream"),
    (orjson.dumps({**CHAT, "model": "gpt-9"}), 404, "model"),
])
async def test_bad_chat_input_gets_a_clear_openai_error(client, payload, status, param):
    resp = await client.post("/v1/chat/completions", data=payload,
                             headers={"content-type": "application/json"})
    assert resp.status == status
    body = await resp.json()
    assert_openai_error(body)
    assert body["error"]["param"] == param


async def test_bad_completion_prompt_is_rejected(client):
    for prompt in (None, 5, [], [1, "a"]):
        body = {"model": "tiny", "prompt": prompt} if prompt is not None else {"model": "tiny"}
        resp = await client.post("/v1/completions", json=body)
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "prompt"


async def test_body_over_the_limit_is_413(client):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 10_000}]}
    resp = await client.post("/v1/chat/completions", json=big)
    assert resp.status == 413
    assert_openai_error(await resp.json(), "payload_too_large")


async def test_upstream_errors_are_passed_through(client):
    resp = await client.post("/v1/chat/completions", json={**CHAT, "temperature": 99})
    assert resp.status == 400
    assert (await resp.json())["message"] == "temperature too high"


async def test_unknown_v1_route_is_an_openai_404(client):
    resp = await client.get("/v1/audio/speech")
    assert resp.status == 404
    assert_openai_error(await resp.json(), "not_found")
    resp = await client.get("/v1/chat/completions")
    assert resp.status == 405


async def test_models_health_and_metrics(client):
    models = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    card = await (await client.get("/v1/models/tiny")).json()
    assert (card["id"], card["object"], card["owned_by"]) == ("tiny", "model", "kvroute")
    for unknown in ("nope", "org/tiny"):
        resp = await client.get(f"/v1/models/{unknown}")
        assert resp.status == 404
        assert_openai_error(await resp.json(), "model_not_found")
    health = await (await client.get("/health")).json()
    assert health["models"]["tiny"]["index"] == "approximate"
    assert health["models"]["tiny"]["block_size"] == 32  # read from vllm:cache_config_info
    worker = client.server.app[keys.ROUTES].get("tiny").tiers[0].pool.all()[0]
    assert worker.vllm_waiting == 3  # scraped
    assert (await client.get("/metrics")).status == 200


async def test_no_healthy_worker_is_503_and_models_hides_it(aiohttp_client):
    client = await aiohttp_client(create_app(router_config(["http://127.0.0.1:1"])))

    async def degraded() -> bool:
        return (await (await client.get("/health")).json())["status"] == "degraded"

    await until(degraded)  # the first health check runs at start-up, not on the (60 s) timer
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 503
    assert_openai_error(await resp.json(), "no_healthy_worker")
    assert (await (await client.get("/v1/models")).json())["data"] == []
    resp = await client.get("/v1/models/tiny")  # configured, but no worker can serve it
    assert resp.status == 404
    assert_openai_error(await resp.json(), "model_not_found")


async def test_connect_error_before_first_byte_is_retried_on_another_worker(aiohttp_client, upstream):
    good = str(upstream.make_url("")).rstrip("/")
    dead = "http://127.0.0.1:1"  # sorts first, so round_robin tries it first
    client = await aiohttp_client(create_app(router_config([dead, good])))
    pool = client.server.app[keys.ROUTES].get("tiny").tiers[0].pool
    for stream in (False, True):
        for w in pool.all():
            w.healthy = True  # as if the health loop had not noticed yet
        resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert resp.status == 200
        assert resp.headers["x-kvroute-worker"] == good
        assert "hi" in (await resp.text())
        assert not pool.get(dead).healthy  # ejected passively


async def test_a_lost_connection_is_retried_on_the_same_worker_without_ejecting_it(
        aiohttp_client, aiohttp_server):
    servers = [await aiohttp_server(fake_worker(name)) for name in ("a", "b")]
    urls = [str(s.make_url("")).rstrip("/") for s in servers]
    client = await aiohttp_client(create_app(router_config(urls)))
    pool = client.server.app[keys.ROUTES].get("tiny").tiers[0].pool
    for i, stream in enumerate((False, True)):
        resp = await client.post("/v1/chat/completions",
                                 json={**CHAT, "stream": stream, "drop_connection_once": i})
        assert resp.status == 200 and "hi" in await resp.text()
        served = urls.index(resp.headers["x-kvroute-worker"])
        seen = [b for b in servers[served].app[SEEN] if b.get("drop_connection_once") == i]
        assert len(seen) == 2  # dropped, then answered by the same worker
        assert all(w.healthy for w in pool.all())


async def test_objects_from_startup_are_frozen_out_of_the_collectors_way(client):
    # a full collection walking the tokenizers' objects stalled streams for ~250 ms (p99)
    assert gc.get_freeze_count() > 0


async def test_failure_mid_stream_ends_with_a_clean_sse_error(client):
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True, "die_mid_stream": True})
    text = (await resp.read()).decode()
    assert resp.status == 200
    last = [e for e in text.split("\n\n") if e][-1]
    assert last.startswith("data: ") and orjson.loads(last[6:])["error"]["code"] == "upstream_unavailable"


async def test_a_cookie_a_worker_sets_is_not_sent_with_other_clients_requests(aiohttp_client, aiohttp_server):
    # A load balancer in front of a worker may set a sticky cookie; a shared jar would send
    # one client's cookie with every later request, from every client.
    worker = fake_worker()
    sent: list[str | None] = []

    @web.middleware
    async def sticky(request: web.Request, handler):
        if request.path == "/v1/chat/completions":
            sent.append(request.headers.get("Cookie"))
        resp = await handler(request)
        resp.set_cookie("AWSALB", "pinned-to-one-node")
        return resp

    worker.middlewares.append(sticky)
    server = await aiohttp_server(worker)
    # By host name: aiohttp's default jar keeps no cookie from a bare IP address.
    client = await aiohttp_client(create_app(router_config([f"http://localhost:{server.port}"])))
    for stream in (False, True, False):
        resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert resp.status == 200, await resp.text()
        await resp.read()
    assert sent == [None, None, None]


def redirecting_worker(status: int, moved_to: list[str]) -> web.Application:
    """A worker whose completions answer ``status`` toward /moved, which records who came."""

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": "/moved"})

    async def moved(request: web.Request) -> web.Response:
        moved_to.append(request.method)
        return web.json_response({"method": request.method})

    return bare_worker(redirect, ("GET", "/moved", moved), ("POST", "/moved", moved))


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_never_followed_the_request_goes_to_another_worker(
        aiohttp_client, aiohttp_server, upstream, status):
    moved_to: list[str] = []
    bad = await aiohttp_server(redirecting_worker(status, moved_to))
    urls = [str(s.make_url("")).rstrip("/") for s in (bad, upstream)]
    client = await aiohttp_client(create_app(router_config(urls)))
    for stream in (False, True, False, True):  # round robin: two of these go to the bad one first
        resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert resp.status == 200, await resp.text()
        assert resp.headers["x-kvroute-worker"] == urls[1]
        await resp.read()
    assert moved_to == []


async def test_a_worker_that_only_redirects_gets_a_502_naming_it_and_the_location(aiohttp_client, aiohttp_server):
    moved_to: list[str] = []
    bad = await aiohttp_server(redirecting_worker(301, moved_to))
    url = str(bad.make_url("")).rstrip("/")
    client = await aiohttp_client(create_app(router_config([url])))
    for stream in (False, True):
        resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert resp.status == 502
        body = await resp.json()
        assert_openai_error(body, "upstream_error")
        assert url in body["error"]["message"] and "HTTP 301 to /moved" in body["error"]["message"]
    assert moved_to == []


async def test_a_worker_whose_health_check_redirects_is_not_healthy(aiohttp_server):
    from kvroute.router.upstream.health import probe
    from kvroute.router.upstream.workers import Worker

    async def moved(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/ok"})

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application()
    app.router.add_get("/health", moved)
    app.router.add_get("/ok", ok)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        why = await probe(session, Worker(str(server.make_url("")).rstrip("/"), "tiny"), 2.0)
        assert why == "health check failed: /health answered 302"
        async with session.get(server.make_url("/health")) as resp:  # it would be, followed
            assert resp.status == 200


@pytest.mark.parametrize("force", [False, True])
async def test_answers_are_asked_for_uncompressed_and_one_compressed_anyway_is_decoded(
        aiohttp_client, aiohttp_server, force):
    # An ingress in front of a worker may gzip JSON when asked (aiohttp asks by default); passed
    # on, the bytes would reach the client unlabelled, and no usage would be counted.
    asked: list[str | None] = []
    text = "compressible " * 200

    async def chat(request: web.Request) -> web.StreamResponse:
        asked.append(request.headers.get("Accept-Encoding"))
        body = await request.json()
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            resp.enable_compression(web.ContentCoding.gzip if force else None)
            await resp.prepare(request)
            for chunk in ({"choices": [{"index": 0, "delta": {"content": text}}]},
                          {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}}):
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        resp = web.json_response({"id": "c", "object": "chat.completion",
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}})
        resp.enable_compression(web.ContentCoding.gzip if force else None)
        return resp

    server = await aiohttp_server(bare_worker(chat))
    client = await aiohttp_client(create_app(router_config([str(server.make_url("")).rstrip("/")])))
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"Accept-Encoding": "identity"})
    assert resp.status == 200 and "Content-Encoding" not in resp.headers
    assert (await resp.json())["choices"][0]["message"]["content"] == text
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                             headers={"Accept-Encoding": "identity"})
    assert resp.status == 200 and "Content-Encoding" not in resp.headers
    events = [line for line in (await resp.read()).split(b"\n") if line.startswith(b"data: {")]
    assert orjson.loads(events[0][6:])["choices"][0]["delta"]["content"] == text
    assert asked == ["identity", "identity"]
    metrics = await (await client.get("/metrics")).text()
    completion = [line for line in metrics.splitlines()
                  if line.startswith("kvroute_worker_completion_tokens_total{")]
    assert completion and float(completion[0].rsplit(" ", 1)[1]) == 14


async def test_a_200_that_is_not_a_completion_is_a_502_not_passed_on(aiohttp_client, aiohttp_server):
    # e.g. an ingress's sign-in page: not a 200 labelled JSON, nor an empty stream that ends
    # without an error.
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html>Sign in</html>", content_type="text/html")

    server = await aiohttp_server(bare_worker(page))
    url = str(server.make_url("")).rstrip("/")
    client = await aiohttp_client(create_app(router_config([url])))
    for stream, what in ((False, "not a JSON object (content-type text/html)"),
                         (True, "without an SSE event (content-type text/html)")):
        resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert resp.status == 502
        body = await resp.json()
        assert_openai_error(body, "upstream_error")
        assert url in body["error"]["message"] and what in body["error"]["message"]


async def test_every_answer_names_its_request_id_and_the_worker_gets_it(client, upstream):
    seen = upstream.app[SEEN_HEADERS]
    ids = []
    for stream in (False, True):
        resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        await resp.read()
        ids.append(resp.headers["x-request-id"])
        assert seen[-1]["x-request-id"] == ids[-1]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids) and ids[0] != ids[1]  # made by the router
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "job-7:step/3"})
    await resp.read()
    assert resp.headers["x-request-id"] == seen[-1]["x-request-id"] == "job-7:step/3"  # the client's own
    for junk in ("two words", "x" * 129, "ü"):
        resp = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": junk})
        await resp.read()
        assert resp.headers["x-request-id"] == seen[-1]["x-request-id"] != junk  # replaced
    for path, body in (("/v1/chat/completions", {**CHAT, "model": "nope"}), ("/v1/chat/completions", {})):
        resp = await client.post(path, json=body, headers={"X-Request-Id": "bad-one"})
        assert resp.status in (400, 404) and resp.headers["x-request-id"] == "bad-one"  # errors too


def erring_stream_worker(code: int, tokens_first: int) -> web.Application:
    """A worker whose streams send ``tokens_first`` chunks, then vLLM's error event (with
    ``code``) and ``[DONE]``, as vLLM does when a request fails inside its stream."""

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(tokens_first):
            chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        err = {"error": {"message": "Internal server error", "type": "InternalServerError", "param": None,
                         "code": code}}
        await resp.write(f"data: {json.dumps(err)}\n\n".encode())  # json.dumps, as vLLM writes it
        await resp.write(b"data: [DONE]\n\n")
        return resp

    return bare_worker(chat)


async def test_an_error_event_before_any_token_is_the_workers_error_status(aiohttp_client, aiohttp_server, upstream):
    bad5 = await aiohttp_server(erring_stream_worker(500, 0))
    urls = [str(s.make_url("")).rstrip("/") for s in (bad5, upstream)]
    client = await aiohttp_client(create_app(router_config(urls)))
    for _ in range(2):  # round robin: one starts on the failing worker, and is retried
        resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert resp.status == 200 and resp.headers["x-kvroute-worker"] == urls[1]
        assert b'"error"' not in await resp.read()
    bad4 = await aiohttp_server(erring_stream_worker(400, 0))
    client = await aiohttp_client(create_app(router_config([str(bad4.make_url("")).rstrip("/")])))
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert resp.status == 400  # the request's fault, passed on as an HTTP error, not a 200 stream
    assert (await resp.json())["error"]["message"] == "Internal server error"


async def test_an_error_event_mid_stream_reaches_the_client_and_counts_against_the_worker(
        aiohttp_client, aiohttp_server):
    bad = await aiohttp_server(erring_stream_worker(500, 2))
    url = str(bad.make_url("")).rstrip("/")
    client = await aiohttp_client(create_app(router_config([url])))
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert resp.status == 200
    events = [e for e in (await resp.read()).split(b"\n\n") if e]
    assert len(events) == 4 and events[2].startswith(b'data: {"error"') and events[3] == b"data: [DONE]"
    registry = client.server.app[keys.METRICS].registry
    assert registry.get_sample_value("kvroute_worker_requests_total",
                                     {"model": "tiny", "worker": url, "status": "upstream_error"}) == 1
    worker = client.server.app[keys.ROUTES].get("tiny").tiers[0].pool.all()[0]
    assert worker.breaker.failures == 1
