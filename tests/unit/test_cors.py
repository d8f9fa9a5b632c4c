"""CORS (``server.cors``): preflights, and the headers that let a page read an answer."""

from __future__ import annotations

import pytest

from kvroute.benchmarks.backends.mock import fake_worker
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from kvroute.router.errors import ConfigError

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
PAGE = "https://chat.example.com"
# What a browser sends before the openai JS client's POST.
PREFLIGHT = {"Origin": PAGE, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}


def config(url: str, cors: dict | None, **extra) -> dict:
    server = {"cors": cors} if cors is not None else {}
    return {"models": [{"name": "m", "workers": [url], "policy": "round_robin"}], "health": {"interval_s": 60},
            "server": server, **extra}


@pytest.fixture
async def worker_url(aiohttp_server) -> str:
    return str((await aiohttp_server(fake_worker("w1"))).make_url("")).rstrip("/")


async def router(aiohttp_client, url: str, cors: dict | None, **extra):
    return await aiohttp_client(create_app(config_from_dict(config(url, cors, **extra))))


async def test_a_preflight_from_an_allowed_origin_is_answered_without_a_key(aiohttp_client, worker_url):
    governed = {"governance": {"tenants": [{"name": "team", "keys": ["sk-team"]}]}}
    client = await router(aiohttp_client, worker_url, {"allow_origins": [PAGE]}, **governed)
    resp = await client.options("/v1/chat/completions", headers=PREFLIGHT)
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == PAGE
    assert resp.headers["Access-Control-Allow-Methods"] == "GET, POST, DELETE"
    assert resp.headers["Access-Control-Allow-Headers"] == "authorization, content-type, x-stainless-os"
    assert resp.headers["Access-Control-Max-Age"] == "600"
    assert "Origin" in resp.headers["Vary"] and "Access-Control-Allow-Credentials" not in resp.headers
    # The request itself still needs its key; the page can read the 401 that says so.
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"Origin": PAGE})
    assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == PAGE
    assert (await resp.json())["error"]["code"]
    resp = await client.post("/v1/chat/completions", json=CHAT,
                             headers={"Origin": PAGE, "Authorization": "Bearer sk-team"})
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == PAGE


async def test_answers_to_an_allowed_origin_name_it_and_expose_the_routers_headers(aiohttp_client, worker_url):
    client = await router(aiohttp_client, worker_url, {"allow_origins": [PAGE, "http://localhost:3000"]})
    for body in (CHAT, {**CHAT, "stream": True}, {**CHAT, "model": "nope"}):
        resp = await client.post("/v1/chat/completions", json=body, headers={"Origin": PAGE})
        await resp.read()
        assert resp.headers["Access-Control-Allow-Origin"] == PAGE, body
        assert resp.headers["Vary"].endswith("Origin")
        exposed = resp.headers["Access-Control-Expose-Headers"].split(", ")
        assert "x-request-id" in exposed and "x-kvroute-tier" in exposed and "retry-after" in exposed
        assert "content-type" not in exposed  # safelisted: readable anyway
    resp = await client.get("/v1/models", headers={"Origin": "http://LOCALHOST:3000"})  # origins are case-blind
    assert resp.headers["Access-Control-Allow-Origin"] == "http://LOCALHOST:3000"
    resp = await client.post("/v1/chat/completions", json=CHAT)  # no Origin: not a browser's cross-origin call
    assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers


async def test_other_origins_methods_and_headers_are_refused(aiohttp_client, worker_url):
    client = await router(aiohttp_client, worker_url,
                          {"allow_origins": [PAGE], "allow_headers": ["Authorization", "Content-Type"]})
    resp = await client.options("/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://evil.example"})
    body = await resp.json()
    assert resp.status == 403 and body["error"]["code"] == "cors_forbidden"
    assert "'https://evil.example' is not in server.cors.allow_origins" in body["error"]["message"]
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = await client.options("/v1/chat/completions", headers=PREFLIGHT)
    assert resp.status == 403 and "x-stainless-os" in (await resp.json())["error"]["message"]
    resp = await client.options("/v1/chat/completions", headers={**PREFLIGHT, "Access-Control-Request-Method": "PUT",
                                                                 "Access-Control-Request-Headers": "content-type"})
    assert resp.status == 403 and "'PUT' is not served" in (await resp.json())["error"]["message"]
    resp = await client.options("/v1/chat/completions",
                                headers={**PREFLIGHT, "Access-Control-Request-Headers": "Content-Type"})
    assert resp.status == 204 and resp.headers["Access-Control-Allow-Headers"] == "content-type"
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"Origin": "https://evil.example"})
    assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers  # the browser hides it


async def test_any_origin_is_a_star_unless_credentials_are_allowed(aiohttp_client, worker_url):
    client = await router(aiohttp_client, worker_url, {"allow_origins": ["*"], "max_age_s": 0})
    resp = await client.options("/v1/completions", headers=PREFLIGHT)
    assert (resp.status, resp.headers["Access-Control-Allow-Origin"]) == (204, "*")
    assert resp.headers["Access-Control-Max-Age"] == "0" and "Vary" not in resp.headers
    client = await router(aiohttp_client, worker_url, {"allow_origins": ["*"], "allow_credentials": True})
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"Origin": PAGE})
    assert resp.headers["Access-Control-Allow-Origin"] == PAGE  # "*" may not carry credentials
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"


async def test_off_by_default(aiohttp_client, worker_url):
    client = await router(aiohttp_client, worker_url, None)
    resp = await client.options("/v1/chat/completions", headers=PREFLIGHT)
    assert resp.status == 405 and "Access-Control-Allow-Origin" not in resp.headers
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"Origin": PAGE})
    assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers


@pytest.mark.parametrize(("cors", "key", "problem"), [
    ({}, "server.cors.allow_origins", "required"),
    ({"allow_origins": ["https://chat.example.com/"]}, "server.cors.allow_origins[0]", "not an origin"),
    ({"allow_origins": ["chat.example.com"]}, "server.cors.allow_origins[0]", "not an origin"),
    ({"allow_origins": ["*"], "allow_headers": ["bad header"]}, "server.cors.allow_headers[0]", "not a header"),
    ({"allow_origins": ["*"], "max_age_s": -1}, "server.cors.max_age_s", "negative"),
    ({"allow_origins": ["*"], "allow_credentials": "yes"}, "server.cors.allow_credentials", "expected bool"),
    ({"allow_origins": ["*"], "origins": ["*"]}, "server.cors.origins", "unknown key"),
])
def test_config_errors_name_the_key(cors, key, problem):
    with pytest.raises(ConfigError) as err:
        config_from_dict(config("http://127.0.0.1:1", cors))
    assert err.value.key == key and problem in str(err.value)
