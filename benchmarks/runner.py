"""The load generator for real fleets: stream chat requests at a router, read vLLM's counters.

``drive`` sends a workload's requests with ``stream: true`` through aiohttp, closed loop
(``concurrency`` in flight) or open loop (each at its trace time), and times the first
streamed chunk (TTFT) and the end of the stream. ``target`` picks the base URL per
request: one router URL, or, for the oracle and direct baselines, a worker chosen on the
client side.

``scrape_fleet`` reads each worker's ``/metrics`` (parsed by kvroute's own
``parse_vllm_metrics``) so that hit rates come from vLLM's counters, as deltas over a run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from kvroute.benchmarks.results import RouterRun
from kvroute.benchmarks.workloads import TraceRecord
from kvroute.router.upstream.scraper import parse_vllm_metrics


def progress_bar(total: int, desc: str):
    """A tqdm bar on stderr counting requests; pass its ``update`` as a ``progress`` callback."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True)


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float | None
    latency_s: float
    error: str | None = None
    worker: str | None = None  # kvroute's x-kvroute-worker response header, when present
    prompt_tokens: int | None = None  # from the stream's final usage chunk
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    predicted_cached_tokens: int | None = None  # kvroute's x-kvroute-predicted-cached-tokens


@dataclass(frozen=True)
class WorkerCounters:
    queries: float
    hits: float
    requests: float
    prompt_tokens: float
    generation_tokens: float


async def scrape_worker(session: aiohttp.ClientSession, url: str) -> WorkerCounters:
    async with session.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
        resp.raise_for_status()
        text = await resp.text()
    stats = parse_vllm_metrics(text)
    requests = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vllm:request_success_total":
                requests += s.value
    return WorkerCounters(
        stats.prefix_queries,
        stats.prefix_hits,
        requests,
        stats.prompt_tokens,
        stats.generation_tokens,
    )


async def scrape_fleet(session: aiohttp.ClientSession, urls: Sequence[str]) -> list[WorkerCounters]:
    return list(await asyncio.gather(*(scrape_worker(session, u) for u in urls)))


async def _one(
    session: aiohttp.ClientSession, base: str, body: dict, timeout_s: float
) -> RequestResult:
    start = time.perf_counter()
    ttft = None
    try:
        async with session.post(
            f"{base}/v1/chat/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            if resp.status != 200:
                text = (await resp.text())[:200]
                return RequestResult(
                    False, None, time.perf_counter() - start, f"HTTP {resp.status}: {text}"
                )
            worker = resp.headers.get("x-kvroute-worker")
            predicted = resp.headers.get("x-kvroute-predicted-cached-tokens")
            usage: dict = {}
            async for line in resp.content:
                if ttft is None and line.startswith(b"data:") and b"[DONE]" not in line:
                    ttft = time.perf_counter() - start
                if b'"prompt_tokens"' in line:  # the usage chunk; others are not parsed
                    usage = _usage(line)
        return RequestResult(True, ttft, time.perf_counter() - start, worker=worker,
                             predicted_cached_tokens=int(predicted) if predicted else None,
                             prompt_tokens=usage.get("prompt_tokens"),
                             cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens"))
    except (TimeoutError, aiohttp.ClientError) as exc:
        return RequestResult(
            False, None, time.perf_counter() - start, f"{type(exc).__name__}: {exc}"
        )


def _usage(line: bytes) -> dict:
    try:
        usage = orjson.loads(line.removeprefix(b"data:")).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return {}
    return usage if isinstance(usage, dict) else {}


async def drive(
    records: Sequence[TraceRecord],
    target: Callable[[TraceRecord], str],
    concurrency: int,
    timeout_s: float = 300.0,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[RequestResult], float]:
    """Send all records; returns results in record order and the wall time taken."""
    results: list[RequestResult | None] = [None] * len(records)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()

        async def run(i: int) -> None:
            results[i] = await _one(session, target(records[i]), records[i].body, timeout_s)
            if progress is not None:
                progress(1)

        if concurrency > 0:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(len(records)):
                queue.put_nowait(i)

            async def worker() -> None:
                while not queue.empty():
                    await run(queue.get_nowait())

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            tasks = []
            for i, rec in enumerate(records):
                delay = rec.t - (time.perf_counter() - start)
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(run(i)))
            await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return [r for r in results if r is not None], elapsed


def to_router_run(
    name: str,
    results: Sequence[RequestResult],
    elapsed: float,
    before: Sequence[WorkerCounters],
    after: Sequence[WorkerCounters],
) -> RouterRun:
    dq = [a.queries - b.queries for a, b in zip(after, before)]
    dh = [a.hits - b.hits for a, b in zip(after, before)]
    errors = [r.error for r in results if not r.ok]
    return RouterRun(
        router=name,
        queries=sum(dq),
        hits=sum(dh),
        per_worker_requests=[a.requests - b.requests for a, b in zip(after, before)],
        per_worker_hit_rate=[h / q if q else 0.0 for h, q in zip(dh, dq)],
        ttft_s=[r.ttft_s for r in results if r.ok and r.ttft_s is not None],
        latency_s=[r.latency_s for r in results if r.ok],
        completed=sum(1 for r in results if r.ok),
        errors=len(errors),
        duration_s=elapsed,
        extra={"first_errors": errors[:3]} if errors else {},
    )


def write_request_log(path: Path, records: Sequence[TraceRecord], results: Sequence[RequestResult]) -> None:
    """One JSON line per request, in send order: its group and session, the worker that
    served it (kvroute routers say which) and the prompt tokens vLLM found cached, for
    reading a router's choices after the run."""
    with path.open("wb") as f:
        for i, (rec, res) in enumerate(zip(records, results)):
            f.write(orjson.dumps({
                "i": i, "group": rec.group, "session": rec.session, "ok": res.ok,
                "worker": res.worker, "prompt_tokens": res.prompt_tokens,
                "cached_tokens": res.cached_tokens, "predicted_cached_tokens": res.predicted_cached_tokens,
                "ttft_s": res.ttft_s,
            }) + b"\n")


def run_standalone(name: str, doc: str | None, add_arguments: Callable[[argparse.ArgumentParser], None],
                   run: Callable[[argparse.Namespace, list[str]], int], argv: list[str] | None) -> int:
    """A ``kvroute bench NAME`` subcommand run on its own (``python -m kvroute.benchmarks.NAME``):
    the same arguments, and ``argv`` recorded as its command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(standalone_parser(name, doc, add_arguments).parse_args(argv), argv)


def standalone_parser(name: str, doc: str | None,
                      add_arguments: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"kvroute bench {name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p
