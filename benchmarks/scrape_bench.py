"""What scraping the workers' vLLM ``/metrics`` costs the router's event loop.

The router scrapes every worker once per ``scrape.interval_s`` (1 s) and parses the page
on its event loop. The loop's share is the loop's CPU time per round over the interval:
at 100% the loop does nothing else, and past it rounds run late. Two measurements per
fleet size and parser:

* **parse**: the CPU time of parsing one round of pages (``--workers`` of them), in this
  thread, median of ``--rounds`` rounds. The parsers are ``prometheus_client`` (the
  router's parser before: prometheus_client's text parser, every sample) and ``scanner``
  (``router.upstream.scraper.parse_vllm_metrics``: only the lines it needs).
* **scrape** (unless ``--no-live``): a whole round of the router's own ``Scraper`` (HTTP
  GET, decoding, parsing, applying) against fake workers in another process that serve the
  page, the loop thread's CPU time per round, median of ``--rounds`` after a warm-up round
  (connections are kept alive between rounds, as in the router).

The page is ``benchmarks/data/vllm_metrics.txt``, rendered by vLLM 0.32's own metrics
code for one model on one engine (``tools/make_vllm_metrics_fixture.py``), or ``--page``
(e.g. ``curl http://worker:8000/metrics > page.txt``).

    python -m kvroute.benchmarks.scrape_bench --workers 8,64,512 --out results/scrape

writes ``scrape_bench.json``, ``scrape_bench.md`` (the table) and ``scrape_bench.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

PAGE = Path(__file__).resolve().parent / "data" / "vllm_metrics.txt"
INTERVAL_S = 1.0  # scrape.interval_s's default


def reference_parse(text: str):
    """The router's parser before the scanner, kept as the reference: prometheus_client's
    text parser over every sample, summing the same names (tests/unit/test_scraper.py
    checks that both agree)."""
    from prometheus_client.parser import text_string_to_metric_families

    from kvroute.router.upstream.scraper import _SAMPLES, VllmStats

    values: dict[str, float] = {}
    block_size: int | None = None
    num_blocks: int | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            field = _SAMPLES.get(sample.name)
            if field is not None:
                values[field] = values.get(field, 0.0) + sample.value
            elif sample.name.startswith("vllm:cache_config_info"):
                bs = sample.labels.get("block_size")
                nb = sample.labels.get("num_gpu_blocks")
                if bs and bs.isdigit():
                    block_size = int(bs)
                if nb and nb.isdigit():
                    num_blocks = int(nb)
    return VllmStats(**values, block_size=block_size, num_gpu_blocks=num_blocks)


def parsers() -> dict[str, Callable[[str], Any]]:
    from kvroute.router.upstream.scraper import parse_vllm_metrics

    return {"prometheus_client": reference_parse, "scanner": parse_vllm_metrics}


def parse_round_cpu(parse: Callable[[str], Any], page: str, workers: int, rounds: int) -> float:
    """Median CPU seconds (this thread) to parse ``workers`` pages."""
    parse(page)  # warm: imports, regex compilation
    times = []
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(workers):
            parse(page)
        times.append(time.thread_time() - start)
    return statistics.median(times)


# ---- fake workers in another process ----------------------------------------------------

def serve(page_path: str) -> None:
    """Serve ``page_path`` at ``/<anything>/metrics`` on a free port; print the port."""
    from aiohttp import web

    body = Path(page_path).read_bytes()

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/{worker}/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock, backlog=4096).start()
        print(sock.getsockname()[1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


@contextmanager
def fake_fleet(page_path: Path):
    proc = subprocess.Popen([sys.executable, "-m", "kvroute.benchmarks.scrape_bench", "--serve", str(page_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


async def scrape_round_cpu(base: str, parse: Callable[[str], Any], workers: int, rounds: int) -> float:
    """Median CPU seconds of the loop thread for one round of the router's Scraper."""
    import aiohttp

    from kvroute.router.metrics import RouterMetrics
    from kvroute.router.upstream import scraper
    from kvroute.router.upstream.workers import Worker

    fleet = [Worker(url=f"{base}/w{i}", model="bench") for i in range(workers)]
    metrics = RouterMetrics()
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)  # as the router's
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        s = scraper.Scraper(session, 30.0, metrics)
        with mock.patch.object(scraper, "parse_vllm_metrics", parse):
            await s.once(fleet)  # warm-up: opens the connections
            times = []
            for _ in range(rounds):
                start = time.thread_time()
                await s.once(fleet)
                times.append(time.thread_time() - start)
    failed = sum(w.scrape_failures for w in fleet)
    if failed:
        raise RuntimeError(f"{failed} scrapes failed; the fake workers could not keep up")
    return statistics.median(times)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """The router's loop: uvloop when installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


# ---- report -----------------------------------------------------------------------------

def run(page_path: Path, sizes: list[int], rounds: int, live: bool) -> dict:
    page = page_path.read_text()
    samples = sum(1 for ln in page.splitlines() if ln and not ln.startswith("#"))
    rows = []
    for name, parse in parsers().items():
        for n in sizes:
            cpu = parse_round_cpu(parse, page, n, rounds)
            row: dict[str, Any] = {"parser": name, "workers": n, "parse_ms_per_page": round(cpu / n * 1e3, 4),
                                   "parse_share": round(cpu / INTERVAL_S, 5)}
            rows.append(row)
    if live:
        with fake_fleet(page_path) as base:
            for row in rows:
                cpu = asyncio.Runner(loop_factory=_loop_factory()).run(
                    scrape_round_cpu(base, parsers()[row["parser"]], row["workers"], rounds))
                row["scrape_share"] = round(cpu / INTERVAL_S, 5)
    return {"page": str(page_path), "page_bytes": len(page.encode()), "page_samples": samples,
            "interval_s": INTERVAL_S, "rounds": rounds, "rows": rows}


def _pct(share: float | None) -> str:
    return "" if share is None else f"{100 * share:.2f}%" if share < 0.1 else f"{100 * share:.0f}%"


def table(doc: dict) -> str:
    lines = [f"page: {doc['page_bytes'] / 1000:.0f} KB, {doc['page_samples']} samples; scrape interval "
             f"{doc['interval_s']:g} s; loop share = loop CPU per round / interval", "",
             "| workers | parser | parse ms/page | loop share: parse | loop share: whole scrape |",
             "|---|---|---|---|---|"]
    for r in sorted(doc["rows"], key=lambda r: (r["workers"], r["parser"])):
        lines.append(f"| {r['workers']} | {r['parser']} | {r['parse_ms_per_page']:.3f} | "
                     f"{_pct(r['parse_share'])} | {_pct(r.get('scrape_share'))} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, color in (("prometheus_client", "tab:red"), ("scanner", "tab:blue")):
        rows = sorted((r for r in doc["rows"] if r["parser"] == name), key=lambda r: r["workers"])
        xs = [r["workers"] for r in rows]
        ax.plot(xs, [100 * r["parse_share"] for r in rows], marker="o", color=color, label=f"{name}: parse")
        if all("scrape_share" in r for r in rows):
            ax.plot(xs, [100 * r["scrape_share"] for r in rows], marker="s", linestyle="--", color=color,
                    label=f"{name}: whole scrape")
    ax.axhline(100, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers scraped every second")
    ax.set_ylabel("event loop share (%)")
    ax.set_title("Scraping vLLM /metrics: the loop's CPU share")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="8,64,512", help="fleet sizes, comma-separated")
    p.add_argument("--rounds", type=int, default=3, help="rounds per measurement (the median is reported)")
    p.add_argument("--page", type=Path, default=PAGE, help="a vLLM /metrics page")
    p.add_argument("--no-live", action="store_true", help="parse only: no scrape rounds against fake workers")
    p.add_argument("--out", type=Path, default=Path("results/scrape"))
    p.add_argument("--serve", help=argparse.SUPPRESS)  # internal: the fake workers' process
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    sizes = [int(n) for n in args.workers.split(",") if n.strip()]
    doc = run(args.page, sizes, args.rounds, not args.no_live)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scrape_bench.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "scrape_bench.md").write_text(table(doc))
    plot(doc, args.out / "scrape_bench.png")
    print(table(doc), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
