"""``kvroute bench cache``: what the exact response cache saves an agent workload, and what it costs.

An agent workload with repeats (``--requests`` deterministic chat requests over
``--distinct`` questions: tool lookups and re-asked questions, Zipf-distributed, so a few
come back often; plus paraphrases, which an exact cache must miss) goes through a kvroute
router to an upstream that answers at once with an answer that names its question. The
same requests go through a router without a cache ("plain"). Client, router and upstream
share one process and event loop, one request at a time, so latencies are one core's.

Reported per store (memory, and Redis when ``--redis-url`` is given or redis-server is on
PATH; ``semantic``: the exact and the semantic cache together, in process, so reworded
repeats can hit too, with semantic hits and their latency apart): hit rate, tokens and
USD saved (at ``--price-in``/``--price-out`` per million), false hits (a replay whose
answer names another question: must be 0), and latency p50/p99 of hits, misses and plain
requests; miss overhead = miss p50 - plain p50. Writes ``cache.json``, ``cache.md`` (the
table) and ``cache.png`` (latency CDFs) under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from kvroute.benchmarks.backends.mock import bare_worker
from kvroute.benchmarks.results import percentile
from kvroute.benchmarks.runner import run_standalone

PROMPT_TOKENS, COMPLETION_TOKENS = 200, 40
TOPICS = ["weather in Paris", "status of order 1142", "open issues in repo kvroute", "the capital of Peru",
          "disk usage on host db-3", "price of SKU 88-A", "owner of service billing", "last deploy of api"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--distinct", type=int, default=200, help="distinct questions the agent asks")
    p.add_argument("--paraphrase-share", type=float, default=0.1, help="share of requests that reword a question")
    p.add_argument("--price-in", type=float, default=3.0, help="USD per million prompt tokens")
    p.add_argument("--price-out", type=float, default=15.0, help="USD per million completion tokens")
    p.add_argument("--redis-url", default=None, help="default: start redis-server from PATH if there is one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-results/cache"))


def workload(n: int, distinct: int, paraphrase_share: float, seed: int) -> list[tuple[str, str]]:
    """(question id, prompt text): Zipf-like repeats of ``distinct`` questions, some reworded."""
    rng = random.Random(seed)
    questions = [f"Look up the {TOPICS[i % len(TOPICS)]} (query #{i})." for i in range(distinct)]
    weights = [1 / (i + 1) for i in range(distinct)]
    out = []
    for _ in range(n):
        i = rng.choices(range(distinct), weights)[0]
        text = questions[i]
        if rng.random() < paraphrase_share:  # the same question, reworded
            text = rng.choice((
                lambda t: "Please " + t[0].lower() + t[1:],  # other words
                lambda t: t.lower().rstrip("."),  # casing and punctuation
                lambda t: "  " + t.replace(" ", "  ") + "\n",  # whitespace
            ))(text)
        out.append((str(i), text))
    return out


def upstream_app() -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        text = body["messages"][-1]["content"]
        qid = re.search(r"#(\d+)", text).group(1)  # type: ignore[union-attr]
        return web.json_response({
            "id": "cmpl-bench", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer for #{qid}"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                      "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}})

    return bare_worker(chat)


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def router_config(worker: str, cache: dict | None, args: argparse.Namespace) -> Any:
    from kvroute.router.config import config_from_dict

    raw: dict = {"models": [{"name": "tiny", "workers": [worker], "policy": "round_robin",
                             "price": {"input_per_m": args.price_in, "output_per_m": args.price_out}}],
                 "health": {"interval_s": 60}, "scrape": {"interval_s": 60}}
    if cache is not None:
        raw["cache"] = cache
    return config_from_dict(raw)


async def drive(url: str, requests: list[tuple[str, str]]) -> list[dict]:
    rows = []
    async with aiohttp.ClientSession() as session:
        for qid, text in requests:
            body = {"model": "tiny", "temperature": 0, "messages": [{"role": "user", "content": text}]}
            start = time.perf_counter()
            async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                answer = await resp.json()
                status = resp.headers.get("x-kvroute-cache", "plain")
                kind = resp.headers.get("x-kvroute-cache-kind")
            rows.append({"qid": qid, "result": status, "kind": kind, "s": time.perf_counter() - start,
                         "false_hit": status == "hit"
                         and answer["choices"][0]["message"]["content"] != f"answer for #{qid}"})
    return rows


async def run_store(worker: str, cache: dict | None, args: argparse.Namespace,
                    requests: list[tuple[str, str]]) -> list[dict]:
    from kvroute.router.app import create_app

    warm = cache
    if cache is not None and "redis" in cache:  # the warm-up's entries under their own prefix
        warm = {**cache, "redis": {**cache["redis"], "prefix": cache["redis"]["prefix"] + ":warm-up"}}
    async with serve(create_app(router_config(worker, warm, args))) as url:
        await drive(url, requests[:50])  # warm-up: connections, first-request costs
        if cache is not None:  # a fresh cache for the measured run
            async with serve(create_app(router_config(worker, cache, args))) as fresh:
                return await drive(fresh, requests)
        return await drive(url, requests)


def summarise(rows: list[dict], plain: list[dict], args: argparse.Namespace) -> dict:
    def ms(values: Sequence[float], q: float) -> float | None:
        p = percentile(sorted(values), q)
        return round(p * 1000, 3) if p is not None else None

    hits = [r["s"] for r in rows if r["result"] == "hit"]
    misses = [r["s"] for r in rows if r["result"] == "miss"]
    plain_s = [r["s"] for r in plain]
    n_hits = len(hits)
    out = {"requests": len(rows), "hits": n_hits, "hit_rate": round(n_hits / len(rows), 4),
           "false_hits": sum(r["false_hit"] for r in rows),
           "saved_tokens": n_hits * (PROMPT_TOKENS + COMPLETION_TOKENS),
           "saved_usd": round(n_hits * (PROMPT_TOKENS * args.price_in + COMPLETION_TOKENS * args.price_out) / 1e6, 6),
           "hit_p50_ms": ms(hits, 50), "hit_p99_ms": ms(hits, 99), "miss_p50_ms": ms(misses, 50),
           "miss_p99_ms": ms(misses, 99), "plain_p50_ms": ms(plain_s, 50), "plain_p99_ms": ms(plain_s, 99)}
    semantic = [r["s"] for r in rows if r["result"] == "hit" and r.get("kind") == "semantic"]
    if semantic:
        out.update(semantic_hits=len(semantic), semantic_hit_p50_ms=ms(semantic, 50),
                   semantic_hit_p99_ms=ms(semantic, 99))
    if out["miss_p50_ms"] is not None and out["plain_p50_ms"] is not None:
        out["miss_overhead_p50_ms"] = round(out["miss_p50_ms"] - out["plain_p50_ms"], 3)
    return out


@contextlib.contextmanager
def redis_server(url: str | None):
    if url is not None or shutil.which("redis-server") is None:
        yield url
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


async def bench(args: argparse.Namespace, redis_url: str | None) -> dict:
    requests = workload(args.requests, args.distinct, args.paraphrase_share, args.seed)
    results: dict[str, Any] = {}
    async with serve(upstream_app()) as worker:
        plain = await run_store(worker, None, args, requests)
        stores = {"memory": {"exact": {}, "store": "memory"},
                  "semantic": {"exact": {}, "semantic": {}, "store": "memory"}}
        if redis_url:
            stores["redis"] = {"exact": {}, "redis": {"url": redis_url, "prefix": f"bench:{time.time_ns()}"}}
        raw = {"plain": plain}
        for name, cache in stores.items():
            raw[name] = await run_store(worker, cache, args, requests)
            results[name] = summarise(raw[name], plain, args)
    results["_rows"] = raw
    return results


def table(results: dict) -> str:
    cols = ["requests", "hit_rate", "false_hits", "saved_tokens", "saved_usd", "hit_p50_ms", "hit_p99_ms",
            "miss_p50_ms", "plain_p50_ms", "miss_overhead_p50_ms", "semantic_hits", "semantic_hit_p50_ms",
            "semantic_hit_p99_ms"]
    lines = ["| store | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        if not name.startswith("_"):
            lines.append(f"| {name} | " + " | ".join(str(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rows = results["_rows"]
    series = [("plain", [r["s"] for r in rows["plain"]])]
    for name in rows:
        if name != "plain":
            for kind in ("hit", "miss"):
                series.append((f"{name} {kind}", [r["s"] for r in rows[name] if r["result"] == kind]))
    for label, values in series:
        values = sorted(v * 1000 for v in values)
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency through the router (ms)")
    ax.set_ylabel("share of requests")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    with redis_server(args.redis_url) as redis_url:
        results = asyncio.run(bench(args, redis_url))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in results.items() if not k.startswith("_")}
    (args.out / "cache.json").write_text(json.dumps({"command": "kvroute bench cache " + " ".join(argv),
                                                    "results": summary}, indent=2) + "\n")
    (args.out / "cache.md").write_text(table(results) + "\n")
    with contextlib.suppress(ImportError):
        plot(results, args.out / "cache.png")
    print(table(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_standalone("cache", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
