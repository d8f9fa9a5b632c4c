"""What cost governance adds to each request: ``Governor.admit`` (on the request path) and
the settlement that follows (off it, in a background task), in memory and with Redis on
loopback.

Each request is tagged (tenant, agent, feature, session) and falls under four budgets
(request, session, agent per day, tenant per day), with loop detection on: the realistic
worst case, not an empty config. The "all features" rows add what agent fleets use: no
session header (the session is derived from a conversation fingerprint), named per-agent
limits matched by tag, a downgrade budget, two rate limits (per key and per agent) and
routed alert webhooks. Requests run one at a time, so the figures are latency, not
throughput. Redis is the one at ``--redis-url``, or a ``redis-server`` this script
starts on a free port and stops again.

    python -m kvroute.benchmarks.governance_bench --requests 2000 --out results/governance

``--faults`` measures store faults instead (docs/reliability.md): admission latency with
Redis healthy and then paused (SIGSTOP, so connections hang rather than fail), under
``on_store_error.budgets`` ``fail_closed`` and ``fail_open``, with ``--concurrency``
requests in flight, and how long after SIGCONT requests are served normally again. It
always starts its own redis-server (it must be able to pause it).

    python -m kvroute.benchmarks.governance_bench --faults --requests 2000 --out results/governance
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson

from kvroute.benchmarks.results import percentile
from kvroute.router.config import config_from_dict
from kvroute.router.errors import GovernanceUnavailable
from kvroute.router.governance.governor import Governor
from kvroute.router.metrics import RouterMetrics
from kvroute.router.requests import CHAT, parse_request
from kvroute.router.routes import ModelRoutes

BUDGETS = [
    {"name": "per-call", "scope": "request", "limit": {"tokens": 8000}},
    {"name": "agent-day", "scope": "agent", "window": "day", "limit": {"usd": 1000}},
    {"name": "tenant-day", "scope": "tenant", "window": "day", "limit": {"usd": 100000}},
]


def _word(i: int) -> str:
    """Distinct letters per request (loop detection ignores digits)."""
    return "".join(chr(97 + (i // 26 ** k) % 26) for k in range(3))


class RedisServer:
    """A throwaway redis-server on a free loopback port, that can be paused (SIGSTOP: clients
    connect and send, and nothing answers) and resumed. Also used by tests/governance."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server not found: install it or pass --redis-url")
        self._folder = tempfile.TemporaryDirectory()
        for _ in range(5):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            self.proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no", "--dir", self._folder.name],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._answers(port):
                self.url = f"redis://127.0.0.1:{port}/0"
                return
            self.proc.kill()  # the port was taken between choosing and binding: try another
            self.proc.wait(10)
        self._folder.cleanup()
        raise SystemExit("could not start redis-server")

    def _answers(self, port: int) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return True
            except OSError:
                time.sleep(0.05)
        return False

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()  # a stopped process does not act on SIGTERM until continued
        self.proc.terminate()
        self.proc.wait(10)
        self._folder.cleanup()


# On top of BUDGETS with --features all (none of them refuses a request here).
FLEET = {
    "budgets": [{"name": "research", "scope": "agent", "match": {"agent": ["agent-1", "agent-2"]},
                 "limit": {"usd": 500}},
                {"name": "search-day", "scope": "feature", "window": "day", "limit": {"usd": 5000},
                 "action": "downgrade", "downgrade_at": 0.8}],
    "rate_limits": [{"name": "per-key", "per": "key", "requests_per_minute": 1_000_000,
                     "tokens_per_minute": 1_000_000_000},
                    {"name": "per-agent", "per": "agent", "requests_per_minute": 1_000_000}],
    "alerts": {"spike_by": ["tenant", "agent", "feature"],
               "webhooks": [{"url": "http://127.0.0.1:9/oncall", "kinds": ["threshold_100"], "format": "slack"},
                            {"url": "http://127.0.0.1:9/team", "kinds": ["threshold_70", "loop_detected"]}]},
}


def _governor(redis_url: str | None, on_store_error: dict | None = None, features: bool = False):
    governance: dict = {"tenants": [{"name": "acme", "keys": ["sk-bench"]}], "budgets": BUDGETS}
    if features:
        governance = {**governance, **FLEET, "budgets": BUDGETS + FLEET["budgets"]}
    if redis_url:
        governance["redis"] = {"url": redis_url, "prefix": f"bench:{time.time_ns()}"}
    if on_store_error:
        governance["on_store_error"] = on_store_error
    cfg = config_from_dict({"models": [{"name": "tiny", "workers": ["http://127.0.0.1:1"],
                                        "price": {"input_per_m": 0.5, "output_per_m": 1.5}}],
                            "governance": governance})
    served = ModelRoutes(cfg).get("tiny")
    return Governor(cfg.governance, RouterMetrics()), served, served.tiers[0]


async def _request(route, i: int, features: bool = False):
    body = {"model": "tiny", "max_tokens": 200,
            "messages": [{"role": "user", "content": f"what does report {_word(i)} say?"}]}
    headers = {"x-kvroute-agent": f"agent-{i % 8}", "x-kvroute-feature": "search",
               "x-kvroute-session": f"s-{i // 10}"}
    if features:  # no session header: one conversation (system prompt + first message) per 10 requests
        del headers["x-kvroute-session"]
        body["messages"] = [{"role": "system", "content": "You are a research agent. " * 20},
                            {"role": "user", "content": f"task {_word(i // 10)}"},
                            {"role": "assistant", "content": "Looking."}, *body["messages"]]
    req = parse_request(CHAT, orjson.dumps(body), headers)
    return req, await route.context(req)


def _done(ctx) -> SimpleNamespace:
    usage = {"prompt_tokens": ctx.prompt_tokens, "completion_tokens": 120}
    return SimpleNamespace(usage=usage, client_started=True, status="ok", worker=None)


async def run(store: str, redis_url: str | None, n: int, features: bool = False) -> dict:
    gov, served, route = _governor(redis_url, features=features)
    admit_s, settle_s = [], []
    for i in range(n + 100):  # the first 100 warm up connections and caches
        req, ctx = await _request(route, i, features)
        t0 = time.perf_counter()
        grant = await gov.admit(req, served, route, ctx, authorization="Bearer sk-bench")
        t1 = time.perf_counter()
        gov.finish(grant, _done(ctx))
        await gov.drain()
        t2 = time.perf_counter()
        if i >= 100:
            admit_s.append(t1 - t0)
            settle_s.append(t2 - t1)
    await gov.close()
    total = [a + s for a, s in zip(admit_s, settle_s)]
    ms = lambda xs, q: round(percentile(xs, q) * 1000, 3)  # noqa: E731
    return {"store": store + (", all features" if features else ""), "requests": n,
            "admit_p50_ms": ms(admit_s, 50), "admit_p99_ms": ms(admit_s, 99),
            "settle_p50_ms": ms(settle_s, 50), "settle_p99_ms": ms(settle_s, 99),
            "total_p50_ms": ms(total, 50), "total_p99_ms": ms(total, 99)}


async def run_faults(server: RedisServer, budgets: str, n: int, concurrency: int, pause_s: float) -> list[dict]:
    """Admission latency with Redis healthy, then paused, under one on_store_error.budgets
    setting. Redis stays paused for ``pause_s`` in all, with a request every millisecond
    after the measured ones (traffic keeps the probes going, as in production); then the
    time from SIGCONT until a request is served normally again, and the reservations of
    reserves that timed out but ran after SIGCONT, taken back."""
    gov, served, route = _governor(server.url, {"budgets": budgets, "kill_switch": "fail_closed"})
    counter = iter(range(10**9))

    async def one() -> Any:
        req, ctx = await _request(route, next(counter))
        try:
            grant = await gov.admit(req, served, route, ctx, authorization="Bearer sk-bench")
        except GovernanceUnavailable:
            return None
        gov.finish(grant, _done(ctx))
        return grant

    async def phase(count: int) -> tuple[list[float], int, int]:
        lat: list[float] = []
        refused = unreserved = 0

        async def client() -> None:
            nonlocal refused, unreserved
            while len(lat) < count:
                t0 = time.perf_counter()
                grant = await one()
                lat.append(time.perf_counter() - t0)
                refused += grant is None
                unreserved += grant is not None and grant.reserved.unreserved

        await asyncio.gather(*(client() for _ in range(concurrency)))
        await gov.drain()
        return lat, refused, unreserved

    await phase(100)  # warm up connections and scripts
    rows, resumed = [], 0.0
    for state in ("healthy", "paused"):
        if state == "paused":
            server.pause()
            paused = time.perf_counter()
        try:
            lat, refused, unreserved = await phase(n)
            while state == "paused" and time.perf_counter() - paused < pause_s:
                await one()
                await asyncio.sleep(0.001)
        finally:
            if state == "paused":
                server.resume()
                resumed = time.perf_counter()
        rows.append({"budgets": budgets, "redis": state, "requests": len(lat), "concurrency": concurrency,
                     "admit_p50_ms": _ms(lat, 50), "admit_p99_ms": _ms(lat, 99), "admit_max_ms": _ms(lat, 100),
                     "over_100ms": sum(x > 0.1 for x in lat), "refused_503": refused,
                     "admitted_unreserved": unreserved})
    # Recovery: a request a millisecond; the first one served with a reservation again ends it.
    back = None
    while time.perf_counter() - resumed < 30:
        grant = await one()
        if grant is not None and not grant.reserved.unreserved:
            back = round(time.perf_counter() - resumed, 3)
            break
        await asyncio.sleep(0.001)
    await gov.drain()
    rows[-1]["recovered_after_s"] = back
    rows[-1]["released"] = await gov.release_orphans()  # the production background loop does this
    store: Any = gov.store  # a RedisStore: count what is still reserved once every grant is settled
    rows[-1]["reservations_left"] = sum([await store.r.zcard(k) async for k in store.r.scan_iter(f"{store.p}:z:*")])
    await gov.close()
    return rows


def _ms(xs: list[float], q: float) -> float:
    """Nearest-rank percentile in ms (q=100: the maximum)."""
    return round((percentile(xs, q) or 0.0) * 1000, 3)


def faults_table(rows: list[dict]) -> str:
    lines = ["| on_store_error.budgets | Redis | admit p50 (ms) | admit p99 | admit max | admissions over 100 ms | "
             "refused (503) | admitted unreserved | served normally again after SIGCONT | "
             "timed-out reservations taken back | reservations left |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        back = "" if r["redis"] == "healthy" else f"{r['recovered_after_s']} s"
        lines.append(f"| {r['budgets']} | {r['redis']} | {r['admit_p50_ms']} | {r['admit_p99_ms']} | "
                     f"{r['admit_max_ms']} | {r['over_100ms']} | {r['refused_503']} | {r['admitted_unreserved']} | "
                     f"{back} | {r.get('released', '')} | {r.get('reservations_left', '')} |")
    return "\n".join(lines) + "\n"


def table(rows: list[dict]) -> str:
    lines = ["| store | admit p50 (ms, on the request path) | admit p99 | settle p50 (ms, background) | "
             "settle p99 | admit+settle p50 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['store']} | {r['admit_p50_ms']} | {r['admit_p99_ms']} | {r['settle_p50_ms']} | "
                     f"{r['settle_p99_ms']} | {r['total_p50_ms']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--redis-url", help="use this Redis instead of starting redis-server")
    p.add_argument("--no-redis", action="store_true", help="measure the in-memory store only")
    p.add_argument("--out", default="results/governance")
    p.add_argument("--features", choices=("base", "all", "both"), default="both",
                   help="budgets and loops only (base), every governance feature on (all), or both")
    p.add_argument("--faults", action="store_true", help="measure admission with Redis healthy and paused")
    p.add_argument("--concurrency", type=int, default=8, help="--faults: requests in flight")
    p.add_argument("--pause-s", type=float, default=3.0, help="--faults: how long Redis stays paused")
    args = p.parse_args(argv)
    if args.faults:
        return _main_faults(args)
    modes = {"base": [False], "all": [True], "both": [False, True]}[args.features]
    rows = [asyncio.run(run("memory", None, args.requests, f)) for f in modes]
    if not args.no_redis:
        server = None
        url = args.redis_url
        if url is None:
            server = RedisServer()
            url = server.url
        try:
            rows += [asyncio.run(run("redis (loopback)", url, args.requests, f)) for f in modes]
        finally:
            if server is not None:
                server.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "governance_bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "governance_bench.md").write_text(table(rows))
    print(table(rows), end="")
    return 0


def _main_faults(args: argparse.Namespace) -> int:
    if args.redis_url or args.no_redis:
        raise SystemExit("--faults starts its own redis-server (it pauses it): drop --redis-url / --no-redis")
    server = RedisServer()
    try:
        rows = [r for mode in ("fail_closed", "fail_open")
                for r in asyncio.run(run_faults(server, mode, args.requests, args.concurrency, args.pause_s))]
    finally:
        server.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "governance_faults.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "governance_faults.md").write_text(faults_table(rows))
    print(faults_table(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
