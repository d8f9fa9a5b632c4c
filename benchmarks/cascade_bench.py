"""Router overhead of a cascade beyond its two model calls, against fake upstream tiers.

``python -m kvroute.benchmarks.cascade_bench --requests 300 --out DIR`` times, on one event loop:
(a) an escalating cascade request (cheap try, confidence, strong try) and (b) the same two
calls made as two plain requests with the tier forced (no cascade); the difference is the
cascade's own cost (internal buffering, body rewrites, metrics). The answer scorer is a
constant here; its own latency is measured separately (``scorer_ms``) and is excluded from
the overhead, as are the fake upstreams (identical in both arms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from kvroute.benchmarks.backends.mock import fake_worker
from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict

BODY = {"model": "auto", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 5}


class _Constant:
    version = "bench"

    def score(self, questions, answers):
        return [0.0] * len(questions)


def _pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


async def bench(n: int) -> dict:
    small, large = TestServer(fake_worker("small")), TestServer(fake_worker("large"))
    await small.start_server()
    await large.start_server()
    url = lambda s: str(s.make_url("")).rstrip("/")  # noqa: E731
    tiers = [{"name": "small", "workers": [url(small)]}, {"name": "large", "workers": [url(large)]}]
    cfg = config_from_dict({"models": [{"name": "auto", "mode": "cascade", "tiers": tiers,
                                        "cascade": {"answer_model": "rules"}}], "health": {"interval_s": 60}})
    app = create_app(cfg)
    app[keys.ROUTES].get("auto").judge.scorer = _Constant()
    client = TestClient(TestServer(app))
    await client.start_server()
    cascade, plain = [], []
    try:
        for i in range(n + 20):
            t0 = time.perf_counter()
            r = await client.post("/v1/chat/completions", json=BODY)
            await r.read()
            t1 = time.perf_counter()
            for tier in ("small", "large"):
                r = await client.post("/v1/chat/completions", json=BODY, headers={"x-kvroute-tier": tier})
                await r.read()
            t2 = time.perf_counter()
            if i >= 20:  # warm-up
                cascade.append((t1 - t0) * 1000)
                plain.append((t2 - t1) * 1000)
    finally:
        await client.close()
        await small.close()
        await large.close()
    diffs = [c - p for c, p in zip(cascade, plain, strict=True)]
    return {"requests": n, "cascade_ms_p50": statistics.median(cascade), "two_plain_ms_p50": statistics.median(plain),
            "overhead_ms_p50": statistics.median(diffs), "overhead_ms_p90": _pct(diffs, 0.9)}


def scorer_ms(repeats: int = 50) -> float:
    from kvroute.classifier.answer import load_answer_scorer

    s = load_answer_scorer()
    q, a = "Janet has 16 eggs and eats 3. How many are left?", "16 - 3 = 13. The answer is 13."
    s.score([q], [a])
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        s.score([q], [a])
        t.append((time.perf_counter() - t0) * 1000)
    return statistics.median(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--out", default=None)
    p.add_argument("--no-scorer", action="store_true", help="skip timing the real answer scorer")
    args = p.parse_args(argv)
    res = asyncio.run(bench(args.requests))
    if not args.no_scorer:
        res["scorer_ms_p50"] = scorer_ms()
    text = json.dumps(res, indent=2)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "cascade_bench.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
