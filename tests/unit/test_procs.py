"""``kvroute serve --procs N``: real supervisor and processes in front of the mock worker.

The router is a subprocess (``python -m kvroute.router.cli serve --config ...``); which
process answered a connection is its ``x-kvroute-process`` header, and every connection
here is a new one, so the kernel spreads them over the processes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
import yaml
import zmq

from kvroute.benchmarks.backends.mock import fake_worker
from kvroute.router.cli import main
from kvroute.router.config import config_from_dict
from kvroute.router.errors import ConfigError
from kvroute.router.siblings import PROCESS_HEADER, merge
from tests.clock import until

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> dict[int, int]:
    """The supervisor's processes: pid -> slot (from their --proc-index)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"--proc-index" in args:
            found[int(entry.name)] = int(args[args.index(b"--proc-index") + 1])
    return found


class Router:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def exited(self, timeout: float) -> int:
        await until(lambda: self.proc.poll() is not None, timeout=timeout, poll_s=0.05)
        return self.proc.returncode

    async def request(self, method: str, path: str, **kw) -> tuple[int, str, bytes]:
        """On a new connection: (status, the process that answered, body)."""
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            async with s.request(method, self.url + path, **kw) as resp:
                return resp.status, resp.headers.get(PROCESS_HEADER, ""), await resp.read()

    async def per_process(self, path: str, procs: int = 2) -> dict[str, bytes]:
        """``path`` as each process answers it (new connections until each has answered)."""
        seen: dict[str, bytes] = {}
        for _ in range(200):  # the kernel hashes each connection: missing one is 2**-200 likely
            status, proc, body = await self.request("GET", path)
            assert status == 200, body
            seen[proc] = body
            if len(seen) == procs:
                return seen
        raise AssertionError(f"only processes {sorted(seen)} answered")


@pytest.fixture
async def worker_url(aiohttp_server) -> str:
    return str((await aiohttp_server(fake_worker())).make_url("")).rstrip("/")


@pytest.fixture
async def start_router(tmp_path) -> AsyncIterator:
    started: list[subprocess.Popen] = []

    async def start(config: dict, *flags: str) -> Router:
        port = free_port()
        path = tmp_path / f"router-{port}.yaml"
        path.write_text(yaml.safe_dump({**config, "server": {"host": "127.0.0.1", "port": port,
                                                             **config.get("server", {})}}))
        log = tmp_path / f"router-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "kvroute.router.cli", "serve", "--config", str(path),
                                     *flags], stdout=out, stderr=subprocess.STDOUT)
        started.append(proc)
        router = Router(proc, f"http://127.0.0.1:{port}", log)

        async def ready() -> bool:
            assert proc.poll() is None, f"kvroute serve exited at start-up:\n{router.output()}"
            return "processes serving" in router.output()

        await until(ready, timeout=60, poll_s=0.1)
        return router

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def plain(worker_url: str, **server) -> dict:
    return {"models": [{"name": "tiny", "workers": [worker_url], "policy": "round_robin"}],
            "server": server, "health": {"interval_s": 60}}


def sample(page: bytes, line_start: str) -> float:
    lines = [line for line in page.decode().splitlines() if line.startswith(line_start)]
    assert len(lines) == 1, (line_start, page.decode())
    return float(lines[0].rsplit(" ", 1)[1])


async def test_both_processes_serve_and_metrics_count_every_request(start_router, worker_url):
    router = await start_router(plain(worker_url, procs=2))
    pids = children(router.proc.pid)
    assert sorted(pids.values()) == [0, 1] and len(pids) == 2  # two processes, distinct pids
    answered: dict[str, int] = {}
    for _ in range(200):
        status, proc, body = await router.request("POST", "/v1/chat/completions", json=BODY)
        assert status == 200, body
        answered[proc] = answered.get(proc, 0) + 1
        if len(answered) == 2 and sum(answered.values()) >= 10:
            break
    assert sorted(answered) == ["0", "1"]
    sent = sum(answered.values())
    # Whichever process answers /metrics, its page counts the requests of both.
    pages = await router.per_process("/metrics")
    for page in pages.values():
        assert sample(page, 'kvroute_worker_requests_total{model="tiny",status="ok"') == sent
        assert sample(page, "kvroute_procs_merged ") == 2
        assert sample(page, 'kvroute_worker_healthy{') == 1
        # One router: one version and its first start; its memory and CPU, all processes'.
        assert sample(page, 'kvroute_build_info{') == 1 and sample(page, "python_info{") == 1
        assert sample(page, "process_resident_memory_bytes ") > 2 * 40e6  # two routers' worth
        assert 0 < time.time() - sample(page, "process_start_time_seconds ") < 300


async def test_the_flag_wins_and_sigterm_drains_every_process(start_router, worker_url):
    router = await start_router(plain(worker_url, procs=1, drain_s=20), "--procs", "2")
    assert len(children(router.proc.pid)) == 2
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    streams: dict[str, aiohttp.ClientResponse] = {}
    try:
        for _ in range(200):  # one slow stream open on each process (1.5 s each)
            resp = await session.post(router.url + "/v1/chat/completions", json={
                **BODY, "stream": True, "fake_completion_tokens": 30, "fake_chunk_delay_s": 0.05})
            assert resp.status == 200
            await resp.content.readline()  # the first chunk: in flight on the router
            proc = resp.headers[PROCESS_HEADER]
            if proc in streams:
                resp.close()
            else:
                streams[proc] = resp
            if len(streams) == 2:
                break
        assert sorted(streams) == ["0", "1"]
        router.proc.send_signal(signal.SIGTERM)
        # Every process drains: new requests are refused while both streams run to the end.
        await until(lambda: router.output().count("SIGTERM: draining") == 2, timeout=10, poll_s=0.05)
        status, _, body = await router.request("POST", "/v1/chat/completions", json=BODY)
        assert status == 503 and b"shutting_down" in body
        for resp in streams.values():
            text = (await resp.read()).decode()
            assert text.rstrip().endswith("data: [DONE]"), text[-200:]
    finally:
        for resp in streams.values():
            resp.close()
        await session.close()
    assert await router.exited(timeout=30) == 0
    assert children(router.proc.pid) == {}


async def test_a_crashed_process_is_restarted(start_router, worker_url):
    router = await start_router(plain(worker_url, procs=2))
    before = children(router.proc.pid)
    victim = next(pid for pid, slot in before.items() if slot == 1)
    os.kill(victim, signal.SIGKILL)
    await until(lambda: "process 1 (pid" in router.output(), timeout=10, poll_s=0.05)

    await until(lambda: "process 1 (pid" in router.output() and "serves again" in router.output(),
                timeout=60, poll_s=0.1)
    now = children(router.proc.pid)
    assert len(now) == 2 and victim not in now and sorted(now.values()) == [0, 1]
    await router.per_process("/health")  # both slots answer again


async def test_every_process_follows_the_same_kv_events(start_router, worker_url, tiny_model_dir):
    """Exact mode: each process subscribes to the worker's publisher (ZMQ PUB fans out to
    every subscriber), so every process holds the same index."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    config = {"models": [{"name": "tiny", "workers": [worker_url], "tokenizer": str(tiny_model_dir),
                          "block_size": 4, "kv_events": {"endpoints": {worker_url: f"tcp://127.0.0.1:{port}"}}}],
              "server": {"procs": 2}, "health": {"interval_s": 60}}
    seq = iter(range(1, 1_000_000))

    def publish(*events: dict) -> None:
        pub.send_multipart([b"kv", next(seq).to_bytes(8, "big"), msgspec.msgpack.encode([time.time(), list(events)])])

    stored = {"type": "BlockStored", "block_hashes": [11, 22, 33], "parent_block_hash": None,
              "token_ids": list(range(12)), "block_size": 4, "lora_id": None, "medium": "GPU"}
    removed = {"type": "BlockRemoved", "block_hashes": [33], "medium": "GPU"}

    async def every_process_holds(blocks: int, *events: dict) -> bool:
        publish(*events)  # again each round: a subscriber still connecting misses a batch
        views = await router.per_process("/health")
        return all(msgspec.json.decode(v)["models"]["tiny"]["workers"][0]["index_blocks"] == blocks
                   for v in views.values())

    try:
        router = await start_router(config)
        await until(lambda: every_process_holds(3, stored), timeout=30, poll_s=0.05)
        await until(lambda: every_process_holds(2, removed), timeout=30, poll_s=0.05)
    finally:
        pub.close()
        ctx.term()


async def test_a_process_that_cannot_start_stops_the_supervisor(tmp_path, worker_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = plain(worker_url, host="127.0.0.1", port=taken.getsockname()[1], procs=2)
        path = tmp_path / "router.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kvroute.router.cli", "serve", "--config", str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert b"address already in use" in out and b"before serving; stopping the others" in out


def test_procs_is_validated_and_state_of_one_process_is_refused(tmp_path, capsys):
    base = {"models": [{"name": "m", "workers": ["http://a:1"]}]}
    assert config_from_dict({**base, "server": {"procs": 4}}).server.procs == 4
    assert config_from_dict(base).server.procs == 1
    for bad in (0, "two"):
        with pytest.raises(ConfigError) as err:
            config_from_dict({**base, "server": {"procs": bad}})
        assert err.value.key == "server.procs"
    governed = {**base, "governance": {"budgets": []}}
    assert config_from_dict(governed).server.procs == 1  # one process: the in-memory store is fine
    with pytest.raises(ConfigError) as err:
        config_from_dict({**governed, "server": {"procs": 2}})
    assert err.value.key == "governance.redis" and "server.procs > 1" in err.value.message
    redis = {"budgets": [], "redis": {"url": "redis://127.0.0.1:1"}}
    assert config_from_dict({**base, "governance": redis, "server": {"procs": 2}}).server.procs == 2
    logged = {**base, "telemetry": {"prompt_logs": {"enabled": True, "file": {"path": str(tmp_path / "p.jsonl")}}}}
    with pytest.raises(ConfigError) as err:
        config_from_dict({**logged, "server": {"procs": 2}})
    assert err.value.key == "telemetry.prompt_logs.file"

    # kvroute config check refuses it; so does serve, for the config key and for the flag.
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({**governed, "server": {"procs": 2}}))
    assert main(["config", "check", str(path)]) == 2
    assert "governance.redis" in capsys.readouterr().err
    path.write_text(yaml.safe_dump(governed))
    assert main(["serve", "--config", str(path), "--procs", "2"]) == 2
    err_text = capsys.readouterr().err
    assert "governance.redis" in err_text and "--procs > 1" in err_text
    assert main(["serve", "--config", str(path), "--procs", "0"]) == 2
    assert "--procs" in capsys.readouterr().err


def test_metrics_merge_sums_counters_and_histograms_and_merges_gauges_by_meaning():
    def page(requests: float, healthy: float, breaker: float, threshold: float, in_flight: float,
             created: float) -> list[dict]:
        return [
            {"name": "kvroute_worker_requests", "type": "counter", "doc": "d", "samples": [
                ["kvroute_worker_requests_total", {"worker": "w", "status": "ok"}, requests],
                ["kvroute_worker_requests_created", {"worker": "w", "status": "ok"}, created]]},
            {"name": "kvroute_ttft_seconds", "type": "histogram", "doc": "d", "samples": [
                ["kvroute_ttft_seconds_bucket", {"le": "0.1"}, requests],
                ["kvroute_ttft_seconds_count", {}, requests], ["kvroute_ttft_seconds_sum", {}, requests / 10]]},
            {"name": "kvroute_worker_healthy", "type": "gauge", "doc": "d",
             "samples": [["kvroute_worker_healthy", {"worker": "w"}, healthy]]},
            {"name": "kvroute_worker_breaker_state", "type": "gauge", "doc": "d",
             "samples": [["kvroute_worker_breaker_state", {"worker": "w"}, breaker]]},
            {"name": "kvroute_classifier_threshold", "type": "gauge", "doc": "d",
             "samples": [["kvroute_classifier_threshold", {}, threshold]]},
            {"name": "kvroute_worker_in_flight_requests", "type": "gauge", "doc": "d",
             "samples": [["kvroute_worker_in_flight_requests", {"worker": "w"}, in_flight]]},
        ]

    only_one = [{"name": "kvroute_retries", "type": "counter", "doc": "d",
                 "samples": [["kvroute_retries_total", {"model": "m"}, 3.0]]}]
    merged = {s.name: s.value for m in merge([page(5, 1, 0, 0.4, 2, 200.0),
                                              page(7, 0, 2, 0.6, 3, 100.0) + only_one]) for s in m.samples}
    assert merged["kvroute_worker_requests_total"] == 12
    assert merged["kvroute_worker_requests_created"] == 100.0  # the earliest
    assert merged["kvroute_ttft_seconds_bucket"] == 12 and merged["kvroute_ttft_seconds_count"] == 12
    assert merged["kvroute_ttft_seconds_sum"] == pytest.approx(1.2)
    assert merged["kvroute_worker_healthy"] == 0  # routable only if every process says so
    assert merged["kvroute_worker_breaker_state"] == 2  # the worst breaker
    assert merged["kvroute_classifier_threshold"] == pytest.approx(0.5)  # the mean
    assert merged["kvroute_worker_in_flight_requests"] == 5  # summed
    assert merged["kvroute_retries_total"] == 3  # a series only one process has
    assert merged["kvroute_procs_merged"] == 2
