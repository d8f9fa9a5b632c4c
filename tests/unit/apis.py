"""What the tests of the request APIs beyond chat share (test_embeddings, test_responses,
test_anthropic): a one-model router config, and a counter's total. Their ``upstream``
fixture, the fake worker, is in conftest.py."""

from __future__ import annotations

from kvroute.benchmarks.backends.mock import SEEN
from kvroute.router.app import create_app
from kvroute.router.config import RouterConfig, config_from_dict


def config(worker: str, name: str = "tiny", upstream_model: str = "tiny-up", **top) -> RouterConfig:
    """One model on ``worker``, routed by prefix, served upstream as ``upstream_model``."""
    return config_from_dict({"models": [{"name": name, "upstream_model": upstream_model, "workers": [worker],
                                         "policy": "prefix"}], "health": {"interval_s": 60}, **top})


async def refused(aiohttp_client, upstream, path: str, body: dict) -> dict:
    """``body`` (for model ``tiny``) sent to ``path``: a 400 whose error is returned, and
    nothing sent to the worker."""
    client = await aiohttp_client(create_app(config(str(upstream.make_url("")).rstrip("/"))))
    resp = await client.post(path, json={"model": "tiny", **body})
    err = (await resp.json())["error"]
    assert resp.status == 400, err
    assert not upstream.app[SEEN]
    return err


def counter(text: str, name: str) -> float:
    """The sum of a metric's series in a /metrics page."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))
