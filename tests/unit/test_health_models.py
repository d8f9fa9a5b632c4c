"""A worker must serve the model it is configured for: one whose /v1/models lists other
names is unhealthy, named so on /health, and routed around until it serves the model."""

from __future__ import annotations

from aiohttp import web

from kvroute.benchmarks.backends.mock import bare_worker, fake_worker
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from tests.clock import until

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


def listing_worker(models: list[str]) -> web.Application:
    """A worker whose /v1/models lists ``models`` (a list the test may change)."""

    async def chat(request: web.Request) -> web.Response:
        return web.json_response({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    async def listed(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in models]})

    return bare_worker(chat, ("GET", "/v1/models", listed))


def url(server) -> str:
    return str(server.make_url("")).rstrip("/")


async def test_a_worker_serving_another_model_is_routed_around_until_it_serves_this_one(
        aiohttp_client, aiohttp_server):
    models = ["llama-8b"]
    wrong = await aiohttp_server(listing_worker(models))
    good = await aiohttp_server(fake_worker())  # lists no models: taken on trust
    client = await aiohttp_client(create_app(config_from_dict({
        "models": [{"name": "tiny", "workers": [url(wrong), url(good)], "policy": "round_robin"}],
        "health": {"interval_s": 0.05}})))

    async def worker_health() -> dict:
        workers = (await (await client.get("/health")).json())["models"]["tiny"]["workers"]
        return {w["url"]: w for w in workers}

    async def wrong_is_out() -> bool:
        return not (await worker_health())[url(wrong)]["healthy"]

    await until(wrong_is_out)
    assert (await worker_health())[url(wrong)]["last_error"] == \
        "serves 'llama-8b', not 'tiny': set the model's upstream_model to one of those"
    for _ in range(4):
        resp = await client.post("/v1/chat/completions", json=CHAT)
        assert resp.status == 200 and resp.headers["x-kvroute-worker"] == url(good)
    models.append("tiny")  # the worker restarted with the right name

    async def wrong_is_back() -> bool:
        return (await worker_health())[url(wrong)]["healthy"]

    await until(wrong_is_back)


async def test_the_name_checked_is_the_one_the_router_sends(aiohttp_client, aiohttp_server):
    worker = await aiohttp_server(listing_worker(["org/tiny-v1"]))
    client = await aiohttp_client(create_app(config_from_dict({
        "models": [{"name": "tiny", "upstream_model": "org/tiny-v1", "workers": [url(worker)],
                    "policy": "round_robin"}],
        "health": {"interval_s": 0.05}})))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200
    health = (await (await client.get("/health")).json())["models"]["tiny"]["workers"][0]
    assert health["healthy"] and health["last_error"] is None
