"""Graceful drain of a real ``kvroute serve`` process: SIGTERM with streams open.

The router is a subprocess (``python -m kvroute.router.cli serve --config ...``) in front of
the mock worker, whose streams are slowed down; the clients are the real ``openai`` package.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
import yaml

from kvroute.benchmarks.backends.mock import fake_worker
from tests.clock import until

MESSAGES = [{"role": "user", "content": "hello"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Router:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def exited(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"kvroute serve still running after {timeout}s:\n{self.output()[-3000:]}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    async def status(self, path: str) -> int:
        async with aiohttp.ClientSession() as s, s.get(self.url + path) as resp:
            return resp.status


@pytest.fixture
async def worker_url(aiohttp_server) -> str:
    return str((await aiohttp_server(fake_worker())).make_url("")).rstrip("/")


@pytest.fixture
async def start_router(worker_url, tmp_path) -> AsyncIterator:
    procs: list[subprocess.Popen] = []

    async def start(drain_s: float) -> Router:
        port = free_port()
        cfg = tmp_path / f"router-{port}.yaml"
        cfg.write_text(yaml.safe_dump({
            "models": [{"name": "tiny", "workers": [worker_url], "policy": "round_robin"}],
            "server": {"host": "127.0.0.1", "port": port, "drain_s": drain_s},
            "health": {"interval_s": 60},
        }))
        log = tmp_path / f"router-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "kvroute.router.cli", "serve", "--config", str(cfg)],
                                    stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        router = Router(proc, f"http://127.0.0.1:{port}", log)

        async def ready() -> bool:
            assert proc.poll() is None, f"kvroute serve exited at start-up:\n{router.output()}"
            try:
                return await router.status("/readyz") == 200
            except aiohttp.ClientError:
                return False

        await until(ready, timeout=60, poll_s=0.1)
        return router

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def client(router: Router) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=30)


async def open_stream(c: openai.AsyncOpenAI, tokens: int, delay_s: float):
    """A slow stream, with its first chunk already read: it is in flight on the router."""
    stream = await c.chat.completions.create(
        model="tiny", messages=MESSAGES, stream=True,
        extra_body={"fake_completion_tokens": tokens, "fake_chunk_delay_s": delay_s})
    chunks = stream.__aiter__()
    first = await chunks.__anext__()
    assert first.choices[0].delta.content == "x"
    return chunks


async def read_all(chunks) -> str:
    return "x" + "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])


async def test_sigterm_drains_open_streams_and_refuses_new_requests(start_router):
    router = await start_router(drain_s=20)
    assert "Running on http://127.0.0.1:" in router.output()
    async with client(router) as c:
        streams = [await open_stream(c, tokens=30, delay_s=0.05) for _ in range(3)]  # 1.5 s each

        router.proc.send_signal(signal.SIGTERM)
        async def not_ready() -> bool:
            return await router.status("/readyz") == 503

        await until(not_ready, timeout=5)  # not ready (the Service moves on), the socket still open
        assert await router.status("/livez") == 200  # but alive: no restart mid-drain
        with pytest.raises(openai.InternalServerError) as refused:
            await c.chat.completions.create(model="tiny", messages=MESSAGES)
        assert refused.value.status_code == 503
        assert refused.value.response.headers["retry-after"] == "1"
        assert refused.value.body["code"] == "shutting_down"

        texts = await asyncio.gather(*(read_all(s) for s in streams))
    assert texts == ["x" * 30] * 3  # every open stream completed, none cut
    assert await router.exited(10) == 0
    assert "draining" in router.output()


async def test_a_stream_longer_than_drain_s_is_cut_with_a_final_sse_error(start_router):
    router = await start_router(drain_s=1)
    async with client(router) as c:
        chunks = await open_stream(c, tokens=400, delay_s=0.05)  # 20 s
        router.proc.send_signal(signal.SIGTERM)
        received = 1
        start = time.monotonic()
        with pytest.raises(openai.APIError) as cut:
            async for chunk in chunks:
                received += len(chunk.choices)
    assert time.monotonic() - start < 8  # cut after drain_s, not hanging until the stream ends
    assert 1 < received < 400
    assert "shutting down" in str(cut.value) and "drain_s" in str(cut.value)
    assert await router.exited(10) == 0


async def test_a_second_signal_cuts_at_once(start_router):
    router = await start_router(drain_s=60)
    async with client(router) as c:
        chunks = await open_stream(c, tokens=400, delay_s=0.05)
        router.proc.send_signal(signal.SIGTERM)
        await until(lambda: "draining" in router.output(), timeout=5)
        router.proc.send_signal(signal.SIGINT)
        with pytest.raises(openai.APIError, match="shutting down"):
            async for _ in chunks:
                pass
    assert await router.exited(10) == 0
