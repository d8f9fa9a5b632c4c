"""Scrape each worker's vLLM ``/metrics`` about once a second.

``parse_vllm_metrics`` is pure: text in, ``VllmStats`` out. The loop drives it with a
timeout per worker and writes the load fields the policies read.

Parsing runs on the event loop, once per worker per second, so it must be cheap. A vLLM
page is about 50 KB and 400 samples (mostly histogram buckets) of which the router reads
about ten; prometheus_client's parser builds every sample in Python (8 ms a page: the
whole loop at about 125 workers). The scanner below finds the few lines it needs with
one regex search and parses only those (0.06 ms a page): see
docs/reliability.md#scraping-worker-metrics and ``benchmarks/scrape_bench.py``. It is not
run in an executor: the work holds the GIL either way, and the hop costs about as much.

A failed scrape (unreachable, timed out, an error status, a malformed page) is counted per
worker in ``kvroute_scrape_errors_total`` and logged when the worker starts failing and
when it answers again; the loop itself never stops.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from ssl import SSLContext

import aiohttp

from kvroute.router.metrics import RouterMetrics
from kvroute.router.upstream.workers import Worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VllmStats:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    prompt_tokens: float = 0.0
    cached_prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0
    block_size: int | None = None
    num_gpu_blocks: int | None = None


# Samples summed over every label set (engines, and models if a page has several).
_SAMPLES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:prompt_tokens_cached_total": "cached_prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:prefix_cache_queries_total": "prefix_queries",
    "vllm:prefix_cache_hits_total": "prefix_hits",
}
_CACHE_CONFIG = "vllm:cache_config_info"  # an info gauge: its labels hold the block size and count

# A sample line of one of those names. The pattern starts with the literal "\nvllm:" (kept
# out of the alternation), so the regex engine jumps between such lines with a fast
# substring search; ``^`` under re.MULTILINE would try every position, 10x slower. The name
# must end where the labels or the value begin, so ``vllm:num_requests_waiting_by_reason``
# is not taken for ``vllm:num_requests_waiting``; a name that merely starts with
# ``vllm:cache_config_info`` counts as it (as before).
_NAMES = "|".join(re.escape(n.removeprefix("vllm:")) for n in _SAMPLES)
_LINE = re.compile(r"\n(vllm:(?:" + _NAMES + r"|cache_config_info[a-zA-Z0-9_:]*))(?=[{ \t])")
# The rest of the line: labels (quoted values may hold '}', escaped quotes, anything but a
# raw newline), blanks, the value; a timestamp after it is ignored. Possessive quantifiers
# (*+, ++) never backtrack, so a malformed line costs linear time, not exponential.
_REST = re.compile(r'(?:\{((?:[^"}\n]++|"(?:[^"\\\n]++|\\.)*+")*+)\})?[ \t]+([^\s]+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\\n]++|\\.)*+)"')


def parse_vllm_metrics(text: str) -> VllmStats:
    """Sum vLLM's samples over engines; read the block size from ``cache_config_info``.

    Reads the Prometheus text format as vLLM (prometheus_client) writes it and gives the
    same results as prometheus_client's parser; a malformed line of a name it reads raises
    ``ValueError``, lines it does not read are not checked."""
    values: dict[str, float] = {}
    block_size: int | None = None
    num_blocks: int | None = None
    text = "\n" + text  # the first line starts after a newline too
    for m in _LINE.finditer(text):
        name = m.group(1)
        rest = _REST.match(text, m.end())
        if rest is None:
            line = text[m.start() + 1:text.find("\n", m.end())]
            raise ValueError(f"malformed sample line: {line[:200]!r}")
        field = _SAMPLES.get(name)
        if field is not None:
            values[field] = values.get(field, 0.0) + _value(rest.group(2))
            continue
        # Label values are not unescaped: only all-digit values are used, and no escape
        # sequence (\\, \", \n) unescapes to a digit.
        for label, value in _LABEL.findall(rest.group(1) or ""):
            if label == "block_size" and value.isdigit():
                block_size = int(value)
            elif label == "num_gpu_blocks" and value.isdigit():
                num_blocks = int(value)
    return VllmStats(**values, block_size=block_size, num_gpu_blocks=num_blocks)


def _value(token: str) -> float:
    if "_" in token:  # float() takes 1_000, the text format does not
        raise ValueError(f"invalid sample value {token!r}")
    return float(token)  # also NaN, +Inf, -Inf and exponents, as the format has them


async def fetch_stats(session: aiohttp.ClientSession, url: str, timeout_s: float,
                      headers: Mapping[str, str] | None = None, ssl: SSLContext | bool = True) -> VllmStats:
    async with session.get(f"{url}/metrics", headers=headers, ssl=ssl,
                           timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        resp.raise_for_status()
        text = await resp.text()
    return parse_vllm_metrics(text)


def apply_stats(worker: Worker, stats: VllmStats) -> None:
    worker.vllm_running = int(stats.running)
    worker.vllm_waiting = int(stats.waiting)
    worker.kv_usage = stats.kv_usage
    if stats.block_size:
        worker.block_size = stats.block_size


OnStats = Callable[[Worker, VllmStats], None]


class Scraper:
    """Scrapes workers' ``/metrics``; counts and logs what fails, per worker."""

    def __init__(self, session: aiohttp.ClientSession, timeout_s: float, metrics: RouterMetrics,
                 on_stats: OnStats | None = None, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.session = session
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.on_stats = on_stats
        self._sleep = sleep

    async def once(self, workers: Iterable[Worker]) -> None:
        """One round: every worker at once. Never raises for a worker's failure."""
        await asyncio.gather(*(self._one(w) for w in list(workers)))

    async def run(self, workers_fn: Callable[[], Iterable[Worker]], interval_s: float) -> None:
        """Scrape every ``interval_s`` until cancelled."""
        while True:
            try:
                await self.once(workers_fn())
            except Exception:  # a bug, not a worker's failure (those are handled per worker): keep going
                log.exception("scrape round failed")
            await self._sleep(interval_s)

    async def _one(self, w: Worker) -> None:
        try:
            stats = await fetch_stats(self.session, w.url, self.timeout_s, w.upstream_headers, w.ssl)
            apply_stats(w, stats)
            if self.on_stats is not None:
                self.on_stats(w, stats)
        except Exception as exc:  # CancelledError is not an Exception: cancelling still works
            self._failed(w, exc)
            return
        if w.scrape_failures:
            log.info("scrape of worker %s succeeds again after %d failures", w.url, w.scrape_failures)
            w.scrape_failures = 0

    def _failed(self, w: Worker, exc: Exception) -> None:
        if w.left:  # it left the pool during the round: its series are gone, keep them so
            return
        self.metrics.scrape_errors.labels(w.model, w.url).inc()
        w.scrape_failures += 1
        expected = isinstance(exc, (TimeoutError, aiohttp.ClientError, OSError, ValueError))
        if w.scrape_failures == 1:  # once per streak; the metric counts every failure
            log.warning("scrape of worker %s failed: %s: %s", w.url, type(exc).__name__, exc,
                        exc_info=None if expected else exc)
        else:
            log.debug("scrape of worker %s failed again: %s: %s", w.url, type(exc).__name__, exc)
