"""Where one kvroute process spends its CPU under load: py-spy samples, grouped by stage.

    python tools/profile_router.py [--requests 4000] [--stream] [--approximate] [--seconds 15] [--out DIR]
    python tools/profile_router.py --keys [--requests 4000]

Starts the overhead benchmark's fake upstream and ``kvroute serve --policy prefix`` with the
tiny model's tokenizer, drives it at 32 concurrent requests (the overhead benchmark's
prompts: 16 groups sharing a ~1,000-token system prompt; ``--approximate``: no tokenizer,
so the router runs in approximate mode), records the router with
``py-spy record --format raw`` and prints each stage's share of the samples (the innermost
frame that names a stage decides), then the ``--top`` functions the samples were in.
Needs ``pip install py-spy`` (the bench extra).

``--keys`` times exact mode's prompt -> block keys instead, stage by stage, with the CPU
time of the thread that runs them (``time.thread_time``): the router runs in this script
with ``Prefixer.keys`` and the functions it calls wrapped, and prints each stage's
microseconds per request for every 1,000 requests (the last report is the steady state).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# (stage, substring of a frame): the innermost frame that matches decides the sample's stage
STAGES = [
    ("metrics (prometheus_client)", "prometheus_client"),
    ("tokenize + chat template", "tokenizers"), ("tokenize + chat template", "transformers/"),
    ("tokenize + chat template", "jinja2"), ("tokenize + chat template", "router/prefix.py"),
    ("json (orjson)", "orjson"),
    ("logging", "logging/"),
    ("telemetry", "router/telemetry"),
    ("governance", "router/governance"),
    ("decide (policy, index)", "router/policies"), ("decide (policy, index)", "router/index.py"),
    ("parse (requests.py)", "router/requests.py"),
    ("proxy (proxy.py)", "router/proxy.py"),
    ("aiohttp client", "aiohttp/client"), ("aiohttp client", "aiohttp/connector"),
    ("aiohttp server", "aiohttp/web"), ("aiohttp server", "aiohttp/http_"), ("aiohttp server", "aiohttp/_http"),
    ("aiohttp other", "aiohttp/"),
    ("kvroute other", "router/"),
    ("event loop", "asyncio/"), ("event loop", "uvloop"),
]


def breakdown(raw: Path) -> list[tuple[str, float]]:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        total += int(n)
        stage = "other"
        for frame in reversed(stack.split(";")):
            stage = next((s for s, sub in STAGES if sub in frame), "")
            if stage:
                break
        counts[stage or "other"] += int(n)
    return [(s, 100 * n / max(1, total)) for s, n in counts.most_common()]


def innermost(raw: Path, top: int) -> list[tuple[str, float]]:
    """The ``top`` functions that samples were in (the innermost frame, line numbers dropped)."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            counts[re.sub(r":\d+\)$", ")", stack.split(";")[-1])] += int(n)
    total = max(1, sum(counts.values()))
    return [(f, 100 * n / total) for f, n in counts.most_common(top)]


def serve_timed(argv: list[str]) -> int:
    """``kvroute serve argv`` with the prompt -> keys stages timed (``--keys``)."""
    from kvroute.router import prefix
    from kvroute.router.cli import main as cli_main

    spent: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()

    def timed(owner: object, name: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[name] += time.thread_time() - start
                calls[name] += 1

        setattr(owner, name, wrapper)

    for name in ("render_chat", "pieces", "uncached_chars", "encode_pieces"):
        timed(prefix.PromptTokenizer, name)
    timed(prefix, "chain_keys")
    keys = prefix.Prefixer.keys

    async def timed_keys(self, body, block_size, root=0):
        start = time.thread_time()  # the inline path has no await: the thread's time is this request's
        try:
            return await keys(self, body, block_size, root)
        finally:
            spent["keys (all)"] += time.thread_time() - start
            calls["keys (all)"] += 1
            if calls["keys (all)"] == 1000:
                n = calls["keys (all)"]
                print("keys stages, µs per request: " + ", ".join(
                    f"{k} {1e6 * v / n:.1f}" for k, v in spent.items()), file=sys.stderr, flush=True)
                spent.clear()
                calls.clear()

    prefix.Prefixer.keys = timed_keys
    return cli_main(argv)


def main() -> int:
    if sys.argv[1:2] == ["--serve-timed"]:
        return serve_timed(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--base-port", type=int, default=9580)
    p.add_argument("--out", default="bench-out/profile")
    p.add_argument("--keys", action="store_true", help="time the prompt -> keys stages instead of py-spy")
    p.add_argument("--approximate", action="store_true", help="no tokenizer: profile approximate mode")
    p.add_argument("--top", type=int, default=15, help="innermost functions to list")
    args = p.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if args.keys and args.approximate:
        raise SystemExit("--keys times exact mode's prompt -> keys stages; it needs the tokenizer")
    if not args.keys and not Path(pyspy).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    from kvroute.benchmarks.overhead import _load
    from kvroute.benchmarks.workloads import WorkloadSpec, iter_records
    from kvroute.router.local.tinymodel import build_tiny_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    up_port, port = args.base_port, args.base_port + 10
    upstream = subprocess.Popen([sys.executable, "-m", "kvroute.benchmarks.overhead", "--fake", "--base-port",
                                 str(up_port), "--upstreams", "1"], start_new_session=True)
    serve = [__file__, "--serve-timed"] if args.keys else ["-m", "kvroute.router.cli"]
    router = subprocess.Popen([sys.executable, *serve, "--log-level", "WARNING", "serve",
                               "--model", "tiny", "--policy", "prefix", "--host", "127.0.0.1", "--port", str(port),
                               "--worker", f"http://127.0.0.1:{up_port}",
                               *([] if args.approximate else ["--tokenizer", str(build_tiny_model())])],
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the router did not start") from None
                time.sleep(0.5)
        bodies = [r.body for r in iter_records(WorkloadSpec(requests=args.requests, groups=16, prefix_tokens=1000,
                                                            max_tokens=1))]
        url = f"http://127.0.0.1:{port}"
        asyncio.run(_load(url, bodies[:200], 32, args.stream))  # warm the piece cache and connections
        if args.keys:
            lat, errors, elapsed = asyncio.run(_load(url, bodies, 32, args.stream))
            print(f"{len(lat) / elapsed:.0f} req/s, {errors} errors")
            return 0
        raw = out / ("stream.txt" if args.stream else "plain.txt")
        spy = subprocess.Popen([pyspy, "record", "-p", str(router.pid), "-d", str(args.seconds), "-r", "200",
                                "-f", "raw", "-o", str(raw), "--gil"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lat, errors, elapsed = asyncio.run(_load(url, bodies, 32, args.stream))
        spy.wait(args.seconds + 30)
    finally:
        for proc in (router, upstream):
            proc.terminate()
            proc.wait(30)
    print(f"{len(lat) / elapsed:.0f} req/s, {errors} errors; py-spy samples in {raw}")
    print("| stage | share of router samples |\n|---|---|")
    for stage, share in breakdown(raw):
        print(f"| {stage} | {share:.1f}% |")
    print("\n| innermost function | share of router samples |\n|---|---|")
    for frame, share in innermost(raw, args.top):
        print(f"| `{frame}` | {share:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
