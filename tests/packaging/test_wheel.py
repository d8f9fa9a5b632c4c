"""Smoke test of the installed wheel: ``kvroute serve`` from the image's venv (built as the
Dockerfile builds it, see conftest.py: no torch, no vLLM) in front of mock vLLM workers,
with a real Redis for governance, answering the real ``openai`` client.

The config has each kind of model the image must serve without a GPU: a tiered model with
the shipped classifier, a cascade with the shipped answer scorer, and a plain model in exact
mode (KV events, the model's tokenizer). A k8s-discovery config in a venv without the k8s
extra must fail at start-up and say which extra to install."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import redis
import yaml
from aiohttp import web

from kvroute.benchmarks.backends.mock import SEEN, fake_worker
from tests.packaging.conftest import BuiltVenv, bare_env

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 90  # the first start compiles nothing, but loads the classifier and tokenizer
_asked = itertools.count()


def question() -> list[dict]:
    """A new question each time: the same prompt five times in a row from one key is a loop
    that governance halts (sessions are derived for unlabelled requests)."""
    return [{"role": "user", "content": f"What is the capital of France? ({next(_asked)})"}]
API_KEY = "sk-packaging-tenant"  # governance on: a key the client sends must be a tenant's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MockFleet:
    """Mock vLLM workers (kvroute.benchmarks.backends.mock) on free ports, served by a loop
    in a background thread."""

    def __init__(self, names: list[str]):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.apps = {name: fake_worker(name) for name in names}
        self.urls: dict[str, str] = {}
        self.runners: list[web.AppRunner] = []
        for name, app in self.apps.items():
            self.urls[name] = asyncio.run_coroutine_threadsafe(self._start(app), self.loop).result(30)

    async def _start(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def seen(self, name: str) -> list[dict]:
        return list(self.apps[name][SEEN])

    def close(self) -> None:
        for runner in self.runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Router:
    """``kvroute serve --config CFG`` from a venv's console script."""

    def __init__(self, venv: BuiltVenv, config: dict, folder: Path, name: str = "router"):
        self.config_path = folder / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.stderr_path = folder / f"{name}.stderr"
        self.stdout_path = folder / f"{name}.stdout"
        env = bare_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(folder / "hf-home"),
                       PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        with self.stderr_path.open("w") as err, self.stdout_path.open("w") as out:
            self.proc = subprocess.Popen([str(venv.bin / "kvroute"), "serve", "--config", str(self.config_path)],
                                         cwd=folder, env=env, stdout=out, stderr=err)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait_exit(15) is None:
                self.proc.kill()
                self.proc.wait(10)


def wait_healthy(router: Router, url: str, models: list[str]) -> dict:
    """GET /health until every model has a healthy worker; fail at once if the router exits."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last = None
    while time.monotonic() < deadline:
        if router.proc.poll() is not None:
            pytest.fail(f"kvroute serve exited with {router.proc.returncode} at start-up:\n{router.output[-5000:]}",
                        pytrace=False)
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                last = json.loads(resp.read())
            if last["status"] == "ok" and set(models) <= set(last["models"]):
                return last
        except OSError:
            pass
        time.sleep(0.25)
    pytest.fail(f"kvroute serve was not healthy in {START_TIMEOUT_S}s (last /health: {last}):\n"
                f"{router.output[-5000:]}", pytrace=False)


@pytest.fixture(scope="module")
def fleet():
    f = MockFleet(["small", "large", "exact"])
    yield f
    f.close()


@pytest.fixture(scope="module")
def served(image_venv, fleet, redis_url, tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    port = free_port()
    tiers = [{"name": "small", "workers": [fleet.urls["small"]], "price": {"input_per_m": 0.1, "output_per_m": 0.2}},
             {"name": "large", "workers": [fleet.urls["large"]], "price": {"input_per_m": 1.0, "output_per_m": 2.0}}]
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "health": {"interval_s": 0.5, "timeout_s": 2},
        "scrape": {"interval_s": 0.5},
        "models": [
            {"name": "auto", "classifier": {}, "tiers": tiers},
            {"name": "cascade", "mode": "cascade", "cascade": {}, "tiers": tiers},
            {"name": "exact", "workers": [fleet.urls["exact"]], "tokenizer": str(tiny_model_dir),
             "kv_events": {"port": free_port()}},
        ],
        "governance": {
            "redis": {"url": redis_url, "prefix": f"kvroute-packaging-{port}"},
            "tenants": [{"name": "packaging", "keys": [API_KEY]}],
            "budgets": [{"name": "per-session", "scope": "session", "limit": {"tokens": 100_000}},
                        {"name": "daily", "scope": "global", "window": "day", "limit": {"usd": 100.0}}],
        },
    }
    router = Router(image_venv, config, folder)
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_healthy(router, url, ["auto", "cascade", "exact"])
        yield router, url, health
    finally:
        router.stop()


@pytest.fixture(scope="module")
def client(served):
    _, url, _ = served
    with openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c  # closed after the test: a dropped client's sockets warn later, in another test


def test_health_reports_the_shipped_classifier(served):
    _, _, health = served
    auto = health["models"]["auto"]
    assert auto["healthy_workers"] == 2 and [t["tier"] for t in auto["tiers"]] == ["small", "large"]
    assert auto["classifier"]["version"] and auto["classifier"]["thresholds"]
    assert health["models"]["exact"]["index"] == "kv_events"


def test_tiered_model(client):
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=question(), max_tokens=8)
    tier = raw.headers.get("x-kvroute-tier")
    assert tier in ("small", "large")
    chat = raw.parse()
    assert chat.choices[0].message.content == f"hi from {tier}"
    assert chat.usage.prompt_tokens == 11 and chat.usage.completion_tokens == 3 and chat.usage.total_tokens == 14


def test_tiered_model_streamed(client):
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=question(), max_tokens=8, stream=True, stream_options={"include_usage": True})
    tier = raw.headers.get("x-kvroute-tier")
    assert tier in ("small", "large")
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"hi from {tier}"
    usage = [c.usage for c in chunks if c.usage]
    assert usage and usage[-1].total_tokens == 14


def test_cascade_model(client):
    raw = client.chat.completions.with_raw_response.create(model="cascade", messages=question(), max_tokens=8)
    tier = raw.headers.get("x-kvroute-tier")
    assert tier in ("small", "large")
    chat = raw.parse()
    assert chat.choices[0].message.content == f"hi from {tier}"
    assert chat.usage.total_tokens >= 14  # the sum over tries when it escalated


def test_exact_mode_model(client, fleet):
    chat = client.chat.completions.create(model="exact", messages=question(), max_tokens=8)
    assert chat.choices[0].message.content == "hi from exact"
    assert chat.usage.total_tokens == 14
    stream = client.chat.completions.create(model="exact", messages=question(), max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hi from exact"
    assert [c.usage.total_tokens for c in chunks if c.usage] == [14]
    assert fleet.seen("exact")[-1]["model"] == "exact"


def test_governance_keeps_its_state_in_redis(client, served, redis_url):
    client.chat.completions.create(model="exact", messages=question(), max_tokens=8, user="packaging-session")
    router, _, _ = served
    prefix = yaml.safe_load(router.config_path.read_text())["governance"]["redis"]["prefix"]
    r = redis.Redis.from_url(redis_url)
    try:
        assert r.keys(f"{prefix}*"), "no governance keys in Redis"
    finally:
        r.close()


def test_no_traceback_in_the_router_log(served, client):
    client.chat.completions.create(model="auto", messages=question(), max_tokens=8)
    router, _, _ = served
    assert router.proc.poll() is None, router.output[-5000:]
    assert "Traceback" not in router.stderr, router.stderr[-5000:]
    assert " ERROR " not in router.stderr, router.stderr[-5000:]


def test_k8s_discovery_without_the_k8s_extra_says_which_extra(image_venv_no_extras, tmp_path):
    venv = image_venv_no_extras
    assert venv.extras == ""
    probe = venv.python("import kubernetes_asyncio")
    assert probe.returncode != 0, "the no-extras venv has kubernetes_asyncio"
    config = {"server": {"host": "127.0.0.1", "port": free_port()}, "discovery": {"source": "k8s"},
              "models": [{"name": "m"}]}
    router = Router(venv, config, tmp_path, "k8s")
    try:
        code = router.wait_exit(20)
        assert code is not None, f"kvroute serve still runs after 20 s:\n{router.output[-3000:]}"
        assert code != 0
        assert "kvroute[k8s]" in router.stderr, router.stderr[-3000:]
        assert "Traceback" not in router.stderr, router.stderr[-3000:]
    finally:
        router.stop()
