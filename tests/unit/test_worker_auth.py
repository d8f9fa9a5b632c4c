"""Workers that require an API key (vLLM --api-key): the router sends it on every call."""

from __future__ import annotations

import pytest

from kvroute.benchmarks.backends.mock import SEEN_AUTH, fake_worker
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from tests.clock import until

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
KEY = "sk-worker-secret-123"


def config(url: str, api_key: dict | None) -> dict:
    model = {"name": "tiny", "workers": [url], "policy": "round_robin"}
    if api_key is not None:
        model["api_key"] = api_key
    return {"models": [model], "health": {"interval_s": 0.05}, "scrape": {"interval_s": 0.05}}


@pytest.fixture
async def locked_worker(aiohttp_server):
    return await aiohttp_server(fake_worker(api_key=KEY))


def url_of(server) -> str:
    return str(server.make_url("")).rstrip("/")


async def test_the_key_from_an_env_variable_is_sent_on_requests_probes_and_scrapes(
        aiohttp_client, locked_worker, monkeypatch, caplog):
    monkeypatch.setenv("TINY_WORKER_KEY", KEY)
    cfg = config_from_dict(config(url_of(locked_worker), {"env": "TINY_WORKER_KEY"}))
    assert KEY not in repr(cfg)
    client = await aiohttp_client(create_app(cfg))
    for stream in (False, True):
        resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert resp.status == 200, await resp.text()
        await resp.read()
    seen = locked_worker.app[SEEN_AUTH]
    # The first scrape runs before serving and the first health probe at start-up: neither
    # waits for its interval, only for the loop task and the worker to answer.
    await until(lambda: {"/health", "/metrics"} <= {path for path, _ in seen})
    paths = {path for path, _ in seen}
    assert {"/v1/chat/completions", "/health", "/metrics"} <= paths
    assert all(auth == f"Bearer {KEY}" for _, auth in seen)
    assert KEY not in caplog.text


async def test_the_key_from_a_mounted_secret_file_is_read_and_stripped(aiohttp_client, locked_worker, tmp_path):
    secret = tmp_path / "api-key"
    secret.write_text(KEY + "\n")
    client = await aiohttp_client(create_app(config_from_dict(config(url_of(locked_worker), {"file": str(secret)}))))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200


async def test_without_the_key_the_workers_401_reaches_the_client(aiohttp_client, locked_worker):
    client = await aiohttp_client(create_app(config_from_dict(config(url_of(locked_worker), None))))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 401
    assert all(auth is None for _, auth in locked_worker.app[SEEN_AUTH])
