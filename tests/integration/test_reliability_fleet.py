"""A hung vLLM worker against the real fleet: SIGSTOP leaves its port accepting connections
while nothing answers, the failure a health check is slowest to see. A stream sent there
is timed out before its first byte (``timeouts.first_byte_s``), retried on the other
worker, and the hung worker's circuit breaker opens; once it answers again, its health
check passes but the open breaker keeps traffic away until the cooldown is over."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request

import pytest

from tests.integration.conftest import run_router

pytestmark = pytest.mark.integration


def post_stream(url: str) -> tuple[str, str]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 4,
            "stream": True}
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.headers["x-kvroute-worker"], resp.read().decode()


def worker_health(url: str) -> dict[str, dict]:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
        return {w["url"]: w for w in json.loads(resp.read())["models"]["tiny"]["workers"]}


def test_a_hung_worker_is_timed_out_before_the_first_byte_and_its_breaker_opens(fleet, tmp_path):
    hung, other = sorted(fleet.urls)  # round_robin tries them in URL order
    pid = next(w.pid for w in fleet.workers if w.url == hung)
    config = {"models": [{"name": "tiny", "workers": fleet.urls, "tokenizer": fleet.model_dir,
                          "policy": "round_robin", "timeouts": {"first_byte_s": 2}}],
              "breaker": {"failures": 1, "cooldown_s": 120}}
    with run_router(config, tmp_path) as router:
        os.kill(pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            served, text = post_stream(router.url)
            took = time.monotonic() - start
        finally:
            os.kill(pid, signal.SIGCONT)
        assert served == other and text.rstrip().endswith("data: [DONE]")
        assert 2 <= took < 30, took  # the first-byte timeout, then the other worker's answer
        metrics = router.metrics_text()
        assert re.search(r'^kvroute_retries_total\{model="tiny"\} 1\.0$', metrics, re.M), metrics
        assert f'kvroute_worker_breaker_state{{model="tiny",worker="{hung}"}} 2.0' in metrics

        deadline = time.monotonic() + 60  # it answers again: its health check passes ...
        while not worker_health(router.url)[hung]["healthy"]:
            assert time.monotonic() < deadline, "the worker did not come back"
            time.sleep(0.5)
        assert worker_health(router.url)[hung]["breaker"] == "open"
        assert [post_stream(router.url)[0] for _ in range(3)] == [other] * 3  # ... but its breaker is open
