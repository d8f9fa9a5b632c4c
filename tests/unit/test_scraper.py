"""The scraper of the workers' vLLM /metrics: the scanner against prometheus_client's parser,
failures counted and logged per worker, a loop that never dies, and its benchmark.

The pages in tests/unit/data and benchmarks/data were rendered by vLLM 0.32's own metrics
code (tools/make_vllm_metrics_fixture.py): histograms, ``cache_config_info`` with some 40
labels, two engines, a second model whose name needs escaping, HTTP and process metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path

import pytest
from aiohttp import web

from kvroute.benchmarks import scrape_bench
from kvroute.benchmarks.scrape_bench import reference_parse
from kvroute.router.metrics import RouterMetrics
from kvroute.router.upstream.scraper import Scraper, VllmStats, parse_vllm_metrics
from kvroute.router.upstream.workers import WorkerPool
from tests.clock import ManualClock, until

DATA = Path(__file__).parent / "data"
PAGES = [DATA / "vllm_metrics.txt", Path(scrape_bench.PAGE)]

# Hand-made lines around what a page may hold: a label value with '}', quotes, '#' and a
# whole sample line in it, names that extend the ones read, a timestamp, no labels,
# exponents, CRLF endings, comments naming the metrics, and the first line of the page.
EDGES = (
    'vllm:num_requests_running{engine="0",model_name="m"} 2\n'
    "# HELP vllm:num_requests_running Number of requests.\n"
    "# TYPE vllm:num_requests_running gauge\n"
    'vllm:num_requests_running{engine="1",model_name="a } b \\" c # d"} 3.5\n'
    'vllm:num_requests_running{model_name="x\\nvllm:num_requests_running 100\\\\"} 1e1 1700000000000\n'
    "vllm:num_requests_running 1\n"
    'vllm:num_requests_waiting_by_reason{reason="capacity"} 50\n'
    "vllm:num_requests_waiting\t4\r\n"
    'vllm:prompt_tokens_cached_by_source_total{source="local"} 77\n'
    'vllm:prompt_tokens_cached_total{engine="0"} 1.5e+07\n'
    'vllm:kv_cache_usage_perc{engine="0"} +Inf\n'
    'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="900",note="block_size=\\"99\\""} 1.0\n'
    'vllm:cache_config_info{block_size="None",engine="1",num_gpu_blocks="1200"} 1.0\n'
    'vllm:cache_config_info_extra{block_size="64"} 1.0\n'
    'http_requests_total{handler="/v1/chat/completions",method="POST",status="2xx"} 3.0\n'
)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.parent.name)
def test_the_scanner_reads_real_vllm_pages_as_prometheus_client_does(page):
    text = page.read_text()
    new, old = parse_vllm_metrics(text), reference_parse(text)
    assert new == old
    assert new.block_size and new.num_gpu_blocks and new.prompt_tokens > 0  # the page does hold them


def test_the_tests_page_has_what_it_claims():
    text = (DATA / "vllm_metrics.txt").read_text()
    assert 'engine="1"' in text and 'model_name="org/\\"tiny\\" \\\\ v2\\n{draft}"' in text
    assert "vllm:request_prompt_tokens_bucket{" in text and "http_requests_total{" in text
    assert text.count("\nvllm:cache_config_info{") == 3


def test_the_scanner_agrees_on_hand_made_edge_cases():
    new, old = parse_vllm_metrics(EDGES), reference_parse(EDGES)
    assert new == old
    assert new == VllmStats(running=16.5, waiting=4, kv_usage=math.inf, cached_prompt_tokens=1.5e7,
                            block_size=64, num_gpu_blocks=1200)


def test_every_engine_and_model_is_summed():
    text = (DATA / "vllm_metrics.txt").read_text()
    running = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith("vllm:num_requests_running{")]
    assert len(running) == 3 and parse_vllm_metrics(text).running == sum(running)


def test_nan_is_read_as_nan():
    assert math.isnan(parse_vllm_metrics("vllm:kv_cache_usage_perc NaN\n").kv_usage)


@pytest.mark.parametrize("line", [
    'vllm:num_requests_running{engine="0" 3',  # no closing brace
    'vllm:num_requests_running{engine="0} 3',  # no closing quote
    "vllm:num_requests_running{} three",
    "vllm:num_requests_running 1_000",  # float() takes it, the format does not
])
def test_a_malformed_line_of_a_metric_it_reads_raises_as_before(line):
    for parse in (parse_vllm_metrics, reference_parse):
        with pytest.raises(ValueError):
            parse(line + "\n")


def test_lines_it_does_not_read_are_not_checked():
    # prometheus_client rejected the whole page for one bad line anywhere; the scanner only
    # reads its own names.
    assert parse_vllm_metrics('other_metric{oops 1\nvllm:num_requests_running 2\n').running == 2


def test_a_malformed_line_costs_linear_time():
    # Possessive quantifiers: no backtracking over a long label block that never closes.
    line = 'vllm:num_requests_running{a="b",' + "c" * 200_000 + "\n"
    with pytest.raises(ValueError):
        parse_vllm_metrics(line)


# ---- the scrape loop --------------------------------------------------------------------

def metrics_page(status: list[int], body: str = "vllm:num_requests_waiting 7\n") -> web.Application:
    """A worker whose /metrics answers ``status[0]`` (a test changes it)."""
    app = web.Application()

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(status=status[0], text=body)

    app.router.add_get("/metrics", metrics)
    return app


def errors(metrics: RouterMetrics, url: str) -> float:
    return metrics.registry.get_sample_value("kvroute_scrape_errors_total", {"model": "m", "worker": url}) or 0.0


async def test_failures_are_counted_per_worker_and_logged_once_per_streak(aiohttp_client, caplog):
    status = [500]
    client = await aiohttp_client(metrics_page(status))
    good = await aiohttp_client(metrics_page([200]))
    bad_url, good_url = (str(c.make_url("")).rstrip("/") for c in (client, good))
    pool = WorkerPool("m", [bad_url, good_url, "http://127.0.0.1:1"])  # the last one is unreachable
    metrics = RouterMetrics()
    scraper = Scraper(client.session, 2.0, metrics)
    with caplog.at_level(logging.INFO, "kvroute.router.upstream.scraper"):
        for _ in range(3):
            await scraper.once(pool.all())
    assert errors(metrics, bad_url) == 3 and errors(metrics, "http://127.0.0.1:1") == 3
    assert errors(metrics, good_url) == 0 and pool.get(good_url).vllm_waiting == 7
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and any(bad_url in w and "500" in w for w in warnings)
    status[0] = 200
    caplog.clear()
    with caplog.at_level(logging.INFO, "kvroute.router.upstream.scraper"):
        await scraper.once(pool.all())
    assert pool.get(bad_url).vllm_waiting == 7 and pool.get(bad_url).scrape_failures == 0
    assert errors(metrics, bad_url) == 3  # a counter: it keeps what it counted
    assert any("succeeds again after 3 failures" in r.getMessage() for r in caplog.records)


async def test_a_malformed_page_counts_as_a_failure(aiohttp_client):
    client = await aiohttp_client(metrics_page([200], body="vllm:num_requests_running{ 1\n"))
    url = str(client.make_url("")).rstrip("/")
    pool = WorkerPool("m", [url])
    metrics = RouterMetrics()
    await Scraper(client.session, 2.0, metrics).once(pool.all())
    assert errors(metrics, url) == 1


async def test_the_loop_survives_its_own_bugs(aiohttp_client, caplog):
    client = await aiohttp_client(metrics_page([200]))
    url = str(client.make_url("")).rstrip("/")
    pool = WorkerPool("m", [url])
    metrics = RouterMetrics()
    clock = ManualClock()
    rounds = []

    def on_stats(worker, stats):
        raise RuntimeError("a bug in a callback")

    def workers():
        rounds.append(len(rounds))
        if len(rounds) == 2:
            raise RuntimeError("a bug listing workers")
        return pool.all()

    task = asyncio.create_task(Scraper(client.session, 2.0, metrics, on_stats, sleep=clock.sleep).run(workers, 1.0))
    try:
        for _ in range(3):  # round 1 (the callback fails), round 2 (listing fails), round 3
            await clock.fire()
        await until(lambda: len(rounds) == 4)
        assert not task.done()
    finally:
        task.cancel()
    assert any("scrape round failed" in r.getMessage() for r in caplog.records)
    await until(lambda: errors(metrics, url) == 3)  # rounds 1, 3 and 4: a failed callback fails the scrape


async def test_a_worker_that_left_during_a_round_is_not_counted(aiohttp_client):
    client = await aiohttp_client(metrics_page([503]))
    url = str(client.make_url("")).rstrip("/")
    pool = WorkerPool("m", [url])
    worker = pool.get(url)
    pool.set_members([])
    metrics = RouterMetrics()
    await Scraper(client.session, 2.0, metrics).once([worker])
    assert metrics.registry.get_sample_value("kvroute_scrape_errors_total", {"model": "m", "worker": url}) is None


# ---- the benchmark ----------------------------------------------------------------------

def test_the_benchmark_writes_json_a_table_and_a_plot(tmp_path):
    assert scrape_bench.main(["--workers", "1,2", "--rounds", "1", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "scrape_bench.json").read_text())
    assert {(r["parser"], r["workers"]) for r in doc["rows"]} == {
        (p, n) for p in ("prometheus_client", "scanner") for n in (1, 2)}
    assert all(r["parse_share"] > 0 and r["scrape_share"] > 0 for r in doc["rows"])
    assert "| 2 | scanner |" in (tmp_path / "scrape_bench.md").read_text()
    assert (tmp_path / "scrape_bench.png").stat().st_size > 0
