"""``governance.isolate_kv_cache``: every tenant's prompts carry its own ``cache_salt``, so
vLLM shares no cached block between tenants, and the router's keys (and so its predicted
hits) keep them apart too. A client's own salt is kept inside the tenant's."""

from __future__ import annotations

import pytest

from kvroute.benchmarks.backends.mock import SEEN
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from kvroute.router.errors import ConfigError
from tests.governance.conftest import bearer, worker_url

TENANTS = [{"name": "acme", "keys": ["sk-acme"]}, {"name": "globex", "keys": ["sk-globex"]}]
SYSTEM = "You are the support assistant of a company that sells routers. " * 20


def cfg(upstream, **governance):
    return config_from_dict({"models": [{"name": "tiny", "workers": [worker_url(upstream)], "policy": "prefix"}],
                             "health": {"interval_s": 60},
                             "governance": {"tenants": TENANTS, "isolate_kv_cache": True, **governance}})


async def test_tenants_get_their_own_salt_and_keys(aiohttp_client, upstream):
    client = await aiohttp_client(create_app(cfg(upstream)))
    chat = {"model": "tiny", "max_tokens": 3, "messages": [{"role": "system", "content": SYSTEM},
                                                           {"role": "user", "content": "hi"}]}

    async def send(key: str, **extra):
        resp = await client.post("/v1/chat/completions", json={**chat, **extra}, headers=bearer(key))
        assert resp.status == 200
        return int(resp.headers["x-kvroute-predicted-cached-tokens"]), upstream.app[SEEN][-1]["cache_salt"]

    predicted, acme = await send("sk-acme")
    assert predicted == 0 and "acme" not in acme  # a digest: tenant names stay off the workers
    again, same = await send("sk-acme")
    assert same == acme and again > 0  # the same salt again, and its blocks predicted cached
    other, globex = await send("sk-globex")
    assert other == 0 and globex != acme  # the same prompt, another tenant: no hit, on vLLM or here
    own, salted = await send("sk-acme", cache_salt="user-7")
    assert salted == f"{acme}:user-7" and own == 0  # a client's salt partitions within its tenant


async def test_apis_that_take_no_salt_are_sent_as_they_came_and_the_others_salted(aiohttp_client, upstream):
    client = await aiohttp_client(create_app(cfg(upstream)))
    for path, body in (("/tokenize", {"model": "tiny", "prompt": "hi"}),
                       ("/score", {"model": "tiny", "text_1": "a", "text_2": "b"}),
                       ("/v1/chat/completions/render", {"model": "tiny", "messages": [{"role": "user",
                                                                                        "content": "hi"}]})):
        assert (await client.post(path, json=body, headers=bearer("sk-acme"))).status == 200
        assert "cache_salt" not in upstream.app[SEEN][-1]
    for path, body in (("/v1/embeddings", {"model": "tiny", "input": "x"}),
                       ("/inference/v1/generate", {"model": "tiny", "token_ids": [1, 2], "sampling_params": {}}),
                       ("/generative_scoring", {"model": "tiny", "query": "q", "items": ["a"],
                                                "label_token_ids": [5]})):
        assert (await client.post(path, json=body, headers=bearer("sk-acme"))).status == 200
        assert "cache_salt" in upstream.app[SEEN][-1], path


def test_isolation_needs_tenants_and_is_a_boolean(upstream):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"models": [{"name": "m", "workers": ["http://a:1"]}],
                          "governance": {"isolate_kv_cache": True}})
    assert "governance.isolate_kv_cache" in str(err.value)
    with pytest.raises(ConfigError):
        cfg(upstream, isolate_kv_cache="yes")
