"""What cost governance adds to each request: ``Governor.admit`` (on the request path) and
the settlement that follows (off it, in a background task), in memory and with Redis on
loopback.

Each request is tagged (tenant, agent, feature, session) and falls under four budgets
(request, session, agent per day, tenant per day), with loop detection on: the realistic
worst case, not an empty config. Requests run one at a time, so the figures are latency,
not throughput. Redis is the one at ``--redis-url``, or a ``redis-server`` this script
starts on a free port and stops again.

    python -m kvroute.benchmarks.governance_bench --requests 2000 --out results/governance
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import orjson

from kvroute.benchmarks.results import percentile
from kvroute.router.config import config_from_dict
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


def _start_redis() -> tuple[subprocess.Popen, str, tempfile.TemporaryDirectory]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found: install it or pass --redis-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tempfile.TemporaryDirectory()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", folder.name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0", folder


async def run(store: str, redis_url: str | None, n: int) -> dict:
    governance: dict = {"tenants": [{"name": "acme", "keys": ["sk-bench"]}], "budgets": BUDGETS}
    if redis_url:
        governance["redis"] = {"url": redis_url, "prefix": f"bench:{time.time_ns()}"}
    cfg = config_from_dict({"models": [{"name": "tiny", "workers": ["http://127.0.0.1:1"],
                                        "price": {"input_per_m": 0.5, "output_per_m": 1.5}}],
                            "governance": governance})
    served = ModelRoutes(cfg).get("tiny")
    route = served.tiers[0]
    gov = Governor(cfg.governance, RouterMetrics())
    admit_s, settle_s = [], []
    for i in range(n + 100):  # the first 100 warm up connections and caches
        body = {"model": "tiny", "max_tokens": 200,
                "messages": [{"role": "user", "content": f"what does report {_word(i)} say?"}]}
        headers = {"x-kvroute-agent": f"agent-{i % 8}", "x-kvroute-feature": "search",
                   "x-kvroute-session": f"s-{i // 10}"}
        req = parse_request(CHAT, orjson.dumps(body), headers)
        ctx = await route.context(req)
        t0 = time.perf_counter()
        grant = await gov.admit(req, served, route, ctx, authorization="Bearer sk-bench")
        t1 = time.perf_counter()
        usage = {"prompt_tokens": ctx.prompt_tokens, "completion_tokens": 120}
        gov.finish(grant, SimpleNamespace(usage=usage, client_started=True, status="ok", worker=None))
        await gov.drain()
        t2 = time.perf_counter()
        if i >= 100:
            admit_s.append(t1 - t0)
            settle_s.append(t2 - t1)
    await gov.close()
    total = [a + s for a, s in zip(admit_s, settle_s)]
    ms = lambda xs, q: round(percentile(xs, q) * 1000, 3)  # noqa: E731
    return {"store": store, "requests": n,
            "admit_p50_ms": ms(admit_s, 50), "admit_p99_ms": ms(admit_s, 99),
            "settle_p50_ms": ms(settle_s, 50), "settle_p99_ms": ms(settle_s, 99),
            "total_p50_ms": ms(total, 50), "total_p99_ms": ms(total, 99)}


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
    args = p.parse_args(argv)
    rows = [asyncio.run(run("memory", None, args.requests))]
    if not args.no_redis:
        proc = folder = None
        url = args.redis_url
        if url is None:
            proc, url, folder = _start_redis()
        try:
            rows.append(asyncio.run(run("redis (loopback)", url, args.requests)))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
                folder.cleanup()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "governance_bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "governance_bench.md").write_text(table(rows))
    print(table(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
