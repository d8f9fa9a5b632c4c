"""A worker's metric series live exactly as long as it is a member of a pool.

Membership changes come from discovery: DNS discovery with scripted answers feeding the
router's own ``ModelRoutes.apply_discovery``, and the same callback driven directly in an
app with mock workers, so that requests, tokens, latencies, scrape errors and KV events
have series to remove.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from kvroute.benchmarks.backends.mock import FAULTS, fake_worker
from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from kvroute.router.metrics import RouterMetrics
from kvroute.router.routes import ModelRoutes
from kvroute.router.upstream.discovery import DiscoveredWorker, DnsDiscovery
from tests.clock import FakeClock, ManualClock, until

STREAM = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "stream": True}


def url_of(server) -> str:
    return str(server.make_url("")).rstrip("/")


def series(metrics: RouterMetrics, url: str) -> dict[str, float]:
    """Every sample on /metrics that names the worker at ``url``."""
    return {f"{s.name}{sorted(s.labels.items())}": s.value for family in metrics.registry.collect()
            for s in family.samples if s.labels.get("worker") == url}


def value(metrics: RouterMetrics, name: str, model: str, url: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"model": model, "worker": url})


def test_every_worker_has_its_health_and_breaker_series_from_the_start():
    metrics = RouterMetrics()
    cfg = config_from_dict({"models": [
        {"name": "tiny", "workers": ["http://a:1", "http://b:1"]},
        {"name": "auto", "tiers": [{"name": "small", "workers": ["http://c:1"]},
                                   {"name": "large", "workers": ["http://d:1"]}]}]})
    ModelRoutes(cfg, metrics=metrics)
    for model, url in (("tiny", "http://a:1"), ("tiny", "http://b:1"), ("auto/small", "http://c:1"),
                       ("auto/large", "http://d:1")):
        assert value(metrics, "kvroute_worker_healthy", model, url) == 1
        assert value(metrics, "kvroute_worker_breaker_state", model, url) == 0


async def test_dns_discovery_joins_and_drops_workers_and_their_series():
    answers = [["10.0.0.1", "10.0.0.2"], ["10.0.0.2", "10.0.0.3"], []]

    class Scripted(DnsDiscovery):
        async def _resolve(self, host: str, port: int) -> list[str]:
            return answers[0] if len(answers) == 1 else answers.pop(0)

    metrics = RouterMetrics()
    cfg = config_from_dict({"models": [{"name": "m"}],
                            "discovery": {"source": "dns", "services": {"m": "svc:8000"}, "interval_s": 1}})
    routes = ModelRoutes(cfg, metrics=metrics)
    clock = ManualClock()
    discovery = Scripted(cfg.discovery, sleep=clock.sleep)
    members = lambda: sorted(w.url for w in routes.get("m").tiers[0].pool.all())  # noqa: E731
    task = asyncio.create_task(discovery.run(routes.apply_discovery))
    try:
        await until(lambda: members() == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"])
        metrics.requests.labels("m", "http://10.0.0.1:8000", "ok").inc()
        metrics.event("http://10.0.0.1:8000", "BlockStored", 4)
        for url in members():
            assert value(metrics, "kvroute_worker_healthy", "m", url) == 1
        await clock.fire()
        await until(lambda: members() == ["http://10.0.0.2:8000", "http://10.0.0.3:8000"])
        assert series(metrics, "http://10.0.0.1:8000") == {}  # requests, KV events, health: all gone
        assert value(metrics, "kvroute_worker_healthy", "m", "http://10.0.0.3:8000") == 1
        await clock.fire()
        await until(lambda: members() == [])
        assert not any(s.labels.get("worker") for f in metrics.registry.collect() for s in f.samples)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def pair(aiohttp_server):
    return sorted([await aiohttp_server(fake_worker(n)) for n in ("a", "b")], key=url_of)


async def test_a_dropped_worker_loses_every_series_it_had(aiohttp_client, pair):
    a, b = (url_of(s) for s in pair)
    cfg = config_from_dict({"models": [{"name": "tiny", "workers": [a], "policy": "round_robin"}],
                            "health": {"interval_s": 60}})
    client = await aiohttp_client(create_app(cfg, clock=FakeClock()))
    app = client.server.app
    metrics, routes = app[keys.METRICS], app[keys.ROUTES]
    routes.apply_discovery([DiscoveredWorker(a, "tiny", None), DiscoveredWorker(b, "tiny", None)])
    assert value(metrics, "kvroute_worker_healthy", "tiny", b) == 1  # before any request or probe
    for _ in range(4):
        resp = await client.post("/v1/chat/completions", json=STREAM)
        assert resp.status == 200
        await resp.read()
    metrics.scrape_errors.labels("tiny", b).inc()
    metrics.event(b, "BlockStored")
    metrics.gap(b)
    names = {name.split("[")[0] for name in series(metrics, b)}
    assert {"kvroute_worker_requests_total", "kvroute_worker_prompt_tokens_total", "kvroute_ttft_seconds_bucket",
            "kvroute_request_seconds_count", "kvroute_worker_in_flight_requests", "kvroute_worker_healthy",
            "kvroute_worker_breaker_state", "kvroute_scrape_errors_total", "kvroute_kv_events_total",
            "kvroute_kv_event_gaps_total"} <= names
    routes.apply_discovery([DiscoveredWorker(a, "tiny", None)])
    assert series(metrics, b) == {}
    assert f'worker="{b}"' not in (await (await client.get("/metrics")).read()).decode()
    assert value(metrics, "kvroute_worker_requests_total", "tiny", a) is None  # a's series stay
    assert metrics.registry.get_sample_value("kvroute_worker_requests_total",
                                             {"model": "tiny", "worker": a, "status": "ok"}) == 2


async def test_a_worker_dropped_mid_request_keeps_its_series_until_the_request_ends(aiohttp_client, pair):
    a, b = (url_of(s) for s in pair)
    pair[1].app[FAULTS].update(stall_first_event_s=30)
    cfg = config_from_dict({"models": [{"name": "tiny", "workers": [b], "timeouts": {"first_byte_s": 0.5}}],
                            "health": {"interval_s": 60}, "retries": {"max_attempts": 1}})
    client = await aiohttp_client(create_app(cfg, clock=FakeClock()))
    metrics, routes = client.server.app[keys.METRICS], client.server.app[keys.ROUTES]
    request = asyncio.create_task(client.post("/v1/chat/completions", json=STREAM))
    await until(lambda: value(metrics, "kvroute_worker_in_flight_requests", "tiny", b) == 1)
    routes.apply_discovery([DiscoveredWorker(a, "tiny", None)])  # b leaves while its request waits
    assert value(metrics, "kvroute_worker_in_flight_requests", "tiny", b) == 1
    assert value(metrics, "kvroute_worker_healthy", "tiny", b) == 1
    resp = await request  # first_byte_s passes: the request fails and is accounted
    assert resp.status == 504
    await until(lambda: series(metrics, b) == {})  # removed after its last update, not re-created (-1)
    assert value(metrics, "kvroute_worker_healthy", "tiny", a) == 1


def test_a_worker_that_rejoins_before_its_last_request_ends_keeps_its_series():
    metrics = RouterMetrics()
    routes = ModelRoutes(config_from_dict({"models": [{"name": "m", "workers": ["http://a:1"]}]}), metrics=metrics)
    pool = routes.get("m").tiers[0].pool
    old = pool.get("http://a:1")
    old.in_flight_requests = 1
    pool.set_members([])
    pool.set_members([("http://a:1", None)])  # back, as a new member
    old.in_flight_requests = 0
    old.request_accounted()
    assert value(metrics, "kvroute_worker_healthy", "m", "http://a:1") == 1


def test_kv_event_series_stay_while_another_pool_has_the_worker():
    metrics = RouterMetrics()
    routes = ModelRoutes(config_from_dict({"models": [{"name": "m", "workers": ["http://a:1"]},
                                                      {"name": "alias", "workers": ["http://a:1"]}]}),
                         metrics=metrics)
    metrics.event("http://a:1", "BlockStored")
    routes.get("m").tiers[0].pool.set_members([])
    assert value(metrics, "kvroute_worker_healthy", "m", "http://a:1") is None
    assert value(metrics, "kvroute_worker_healthy", "alias", "http://a:1") == 1
    assert metrics.registry.get_sample_value("kvroute_kv_events_total",
                                             {"worker": "http://a:1", "type": "BlockStored"}) == 1
    routes.get("alias").tiers[0].pool.set_members([])
    assert series(metrics, "http://a:1") == {}


def test_a_tiers_workers_lose_the_series_labelled_with_the_model_and_with_the_tier():
    metrics = RouterMetrics()
    routes = ModelRoutes(config_from_dict({"models": [
        {"name": "auto", "tiers": [{"name": "small", "workers": ["http://c:1"]},
                                   {"name": "large", "workers": ["http://d:1"]}]}]}), metrics=metrics)
    metrics.requests.labels("auto", "http://c:1", "ok").inc()  # request series carry the model's name
    metrics.requests.labels("auto", "http://d:1", "ok").inc()
    routes.apply_discovery([DiscoveredWorker("http://d:1", "auto", "large")])
    assert series(metrics, "http://c:1") == {}
    assert metrics.registry.get_sample_value("kvroute_worker_requests_total",
                                             {"model": "auto", "worker": "http://d:1", "status": "ok"}) == 1


def test_bound_series_are_the_labelled_ones_and_rebound_after_a_worker_leaves():
    metrics = RouterMetrics()
    bound = metrics.worker_series("tiny", "http://a:1")
    assert metrics.worker_series("tiny", "http://a:1") is bound  # bound once
    bound.requests("ok").inc()
    bound.prompt_tokens.inc(7)
    assert metrics.registry.get_sample_value("kvroute_worker_requests_total",
                                             {"model": "tiny", "worker": "http://a:1", "status": "ok"}) == 1
    assert value(metrics, "kvroute_worker_prompt_tokens_total", "tiny", "http://a:1") == 7
    metrics.forget_worker(["tiny"], "http://a:1")
    assert series(metrics, "http://a:1") == {}
    again = metrics.worker_series("tiny", "http://a:1")
    assert again is not bound  # a rejoined worker's updates reach /metrics, not the removed series
    again.prompt_tokens.inc(2)
    assert value(metrics, "kvroute_worker_prompt_tokens_total", "tiny", "http://a:1") == 2


def test_the_page_carries_the_process_python_and_version_series():
    """What a Prometheus client exports by default, on kvroute's own registry, and its version."""
    from importlib.metadata import version

    from kvroute.router.metrics import RouterMetrics

    page = RouterMetrics().render().decode()
    assert f'kvroute_build_info{{version="{version("kvroute")}"}} 1.0' in page
    for series in ("process_resident_memory_bytes ", "process_cpu_seconds_total ", "process_open_fds ",
                   "process_start_time_seconds ", "python_info{", "python_gc_collections_total{"):
        assert any(line.startswith(series) for line in page.splitlines()), series
