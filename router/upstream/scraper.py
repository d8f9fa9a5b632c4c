"""Scrape each worker's vLLM ``/metrics`` about once a second.

``parse_vllm_metrics`` is pure: text in, ``VllmStats`` out. The loop drives it with a
timeout per worker and writes the load fields the policies read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

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


def parse_vllm_metrics(text: str) -> VllmStats:
    """Sum vLLM's samples over engines; read the block size from ``cache_config_info``."""
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


async def fetch_stats(session: aiohttp.ClientSession, url: str, timeout_s: float,
                      headers: Mapping[str, str] | None = None) -> VllmStats:
    async with session.get(f"{url}/metrics", headers=headers,
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


async def scrape_once(session: aiohttp.ClientSession, workers: Iterable[Worker], timeout_s: float,
                      on_stats: OnStats | None = None) -> None:
    workers = list(workers)

    async def one(w: Worker) -> None:
        try:
            stats = await fetch_stats(session, w.url, timeout_s, w.upstream_headers)
            apply_stats(w, stats)
            if on_stats is not None:
                on_stats(w, stats)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            log.debug("scrape of %s failed: %s", w.url, exc)

    await asyncio.gather(*(one(w) for w in workers))


async def scrape_loop(session: aiohttp.ClientSession, workers_fn, interval_s: float, timeout_s: float,
                      on_stats: OnStats | None = None) -> None:
    while True:
        with contextlib.suppress(Exception):
            await scrape_once(session, workers_fn(), timeout_s, on_stats)
        await asyncio.sleep(interval_s)
