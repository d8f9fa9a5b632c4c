"""The app factory. Nothing runs at import time; every resource has one cleanup context."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import Executor, ThreadPoolExecutor

import aiohttp
from aiohttp import web

from kvroute.router import keys, proxy
from kvroute.router.admission import Admission
from kvroute.router.cache import stage as response_cache
from kvroute.router.config import RouterConfig
from kvroute.router.cors import Cors
from kvroute.router.governance.clock import Clock
from kvroute.router.governance.governor import Governor
from kvroute.router.handlers import access_log_middleware, add_routes, error_middleware
from kvroute.router.metrics import RouterMetrics
from kvroute.router.routes import Executors, ModelRoute, ModelRoutes
from kvroute.router.stored_responses import StoredResponses
from kvroute.router.telemetry import Telemetry
from kvroute.router.tls import Refresher, UpstreamTls, client_context
from kvroute.router.upstream.health import HealthChecker
from kvroute.router.upstream.scraper import Scraper

log = logging.getLogger(__name__)


def create_app(cfg: RouterConfig, metrics: RouterMetrics | None = None, *,
               clock: Clock | None = None, span_exporter: object = None) -> web.Application:
    """``span_exporter``: an OpenTelemetry span exporter to send traces to instead of OTLP's."""
    outer = [access_log_middleware] if cfg.telemetry.access_log.enabled else []
    cors = Cors(cfg.server.cors) if cfg.server.cors is not None else None
    inner = [cors.middleware] if cors is not None else []  # a refused preflight is an error body
    app = web.Application(middlewares=[*outer, error_middleware, *inner], client_max_size=cfg.server.max_body_bytes)
    app[keys.CONFIG] = cfg
    app[keys.METRICS] = metrics or RouterMetrics()
    gov = cfg.governance
    app[keys.TELEMETRY] = Telemetry(cfg.telemetry, app[keys.METRICS], span_exporter=span_exporter,
                                    tag_values=dict(gov.tag_values) if gov is not None else None,
                                    governed=gov is not None)
    if cfg.governance is not None:
        app[keys.GOVERNOR] = Governor(cfg.governance, app[keys.METRICS], clock)
    if any(m.cache is not None and m.cache.on for m in cfg.models):
        app[keys.CACHE] = response_cache.ResponseCache(cfg, app[keys.METRICS], app.get(keys.GOVERNOR), clock)
        app.on_response_prepare.append(response_cache.on_response_prepare)  # x-kvroute-cache: miss | bypass
    executors = app[keys.EXECUTORS] = _executors()
    routes = ModelRoutes(cfg, executors, app[keys.METRICS], clock=clock)  # breakers, retries
    app[keys.ROUTES] = routes
    app[keys.STORED_RESPONSES] = StoredResponses(routes, app[keys.METRICS],
                                                 redis=gov.redis if gov is not None else None)
    admission = app[keys.ADMISSION] = Admission(cfg.server, app[keys.METRICS], clock)
    app.on_response_prepare.append(admission.on_response_prepare)  # a drain cut's last SSE event
    app.on_response_prepare.append(proxy.on_response_prepare)  # a whole answer's time in kvroute ends
    if cors is not None:
        app.on_response_prepare.append(cors.on_response_prepare)  # after the hooks that add headers
    for route in routes.by_key.values():
        def on_members(_workers: list, route: ModelRoute = route) -> None:
            admission.worker_freed(route)  # a worker that joined takes queued requests

        route.pool.on_change(on_members)

    def on_worker_state(worker) -> None:
        # A worker that failed or came back may have lost its KV cache.
        routes.route_of(worker).index.drop_worker(worker.url)
        if not worker.left:  # a probe that ends after the worker left must not revive its series
            app[keys.METRICS].healthy.labels(worker.model, worker.url).set(1 if worker.healthy else 0)
        admission.worker_freed(routes.route_of(worker))  # one back in service takes queued requests

    app[keys.HEALTH] = HealthChecker(on_worker_state, served_name=lambda w: routes.route_of(w).cfg.served_name)
    add_routes(app)
    app.cleanup_ctx.extend([_client_session, _tokenizer_executor, _classifiers, _discovery, _kv_events, _scraper,
                            _tls_refresh,
                            _health_loop, _governor, _response_cache, _stored_responses, _telemetry,
                            _freeze_startup_objects])
    return app


async def _stored_responses(app: web.Application) -> AsyncIterator[None]:
    """Records shared in Redis: the writes still under way finish, then the client closes."""
    yield
    await app[keys.STORED_RESPONSES].close()


async def _freeze_startup_objects(app: web.Application) -> AsyncIterator[None]:
    # Tokenizers, chat templates and the classifier's torch leave millions of objects that
    # live as long as the process; frozen, a full collection no longer walks them all
    # while requests wait on the event loop.
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    cfg = app[keys.CONFIG].server
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s, sock_connect=cfg.connect_timeout_s)
    # No cookie jar: a cookie one answer sets (a sticky load balancer's) must not ride on
    # every other client's requests. Answers are asked for uncompressed (the router reads
    # every one, and its client gets its own encoding); one compressed anyway is decoded.
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     headers={"Accept-Encoding": "identity"},
                                     cookie_jar=aiohttp.DummyCookieJar()) as session:
        app[keys.SESSION] = session
        yield


def _executors() -> Executors:
    """One thread pool per kind of blocking work (threads start only when first used).

    Tokenization: HF fast tokenizers encode without the GIL, so a few threads tokenize
    long prompts in parallel; more would only wait on the GIL for chat templating. The
    classifier and the answer scorer score a batch at a time in numpy (which also lets the
    GIL go): two threads each, so a model (re)load never holds up scoring."""
    cpus = os.cpu_count() or 1
    return Executors(
        tokenizer=ThreadPoolExecutor(max_workers=max(2, min(4, cpus)), thread_name_prefix="kvroute-tokenizer"),
        classifier=ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvroute-classifier"),
        judge=ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvroute-judge"),
    )


def _shutdown(executor: Executor | None) -> None:
    if executor is not None:
        executor.shutdown(wait=False, cancel_futures=True)


async def _tokenizer_executor(app: web.Application) -> AsyncIterator[None]:
    yield
    _shutdown(app[keys.EXECUTORS].tokenizer)


async def _run_background(coro) -> AsyncIterator[None]:
    task = asyncio.create_task(coro)
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _classifiers(app: web.Application) -> AsyncIterator[None]:
    """Load each tiered model's classifier before serving; keep them fresh after."""
    choosers = app[keys.ROUTES].choosers()
    for chooser in choosers:
        await chooser.load()
    for judge in app[keys.ROUTES].judges():  # a cascade's answer scorer (router/confidence.py)
        await judge.load()
    tasks = [asyncio.create_task(loop) for c in choosers for loop in (c.reload_loop(), c.sync_loop())]
    yield
    for task in tasks:
        task.cancel()
    for chooser in choosers:
        await chooser.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    _shutdown(app[keys.EXECUTORS].classifier)
    _shutdown(app[keys.EXECUTORS].judge)


async def _discovery(app: web.Application) -> AsyncIterator[None]:
    """Workers from dns or k8s discovery join and leave pools without a restart."""
    from kvroute.router.upstream.discovery import make_discovery

    discovery = make_discovery(app[keys.CONFIG].discovery)
    if discovery is None:
        yield
        return

    def on_done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("worker discovery stopped: %s", task.exception())

    task = asyncio.create_task(discovery.run(app[keys.ROUTES].apply_discovery))
    task.add_done_callback(on_done)
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def _tls_refresh(app: web.Application) -> AsyncIterator[None]:
    """Pools with ``tls`` files take renewed certificates and CAs without a restart."""
    tasks = []
    for route in app[keys.ROUTES].by_key.values():
        tls = route.cfg.tls
        if tls is None or not tls.files:
            continue

        def load(route: ModelRoute = route, tls: UpstreamTls = tls) -> None:
            route.pool.set_ssl(client_context(tls, f"{route.cfg.key}.tls"))

        tasks.append(asyncio.create_task(Refresher(tls.files, load, f"{route.cfg.key}.tls").run(tls.reload_s)))
    yield
    for task in tasks:
        task.cancel()


async def _kv_events(app: web.Application) -> AsyncIterator[None]:
    """Exact mode: one KV-event subscriber per worker, following pool membership."""
    routes = app[keys.ROUTES]
    exact = [r for r in routes.by_key.values() if r.cfg.kv_events is not None]
    if not exact:
        yield
        return
    from kvroute.router.kv_events import EventHub

    hub = EventHub(app[keys.METRICS])
    for route in exact:
        def sync(_workers, route=route) -> None:
            hub.sync(route.index, route.cfg.kv_events, [w.url for w in route.pool.all()])

        route.pool.on_change(sync)
        sync(None)
    yield
    await hub.close()


async def _scraper(app: web.Application) -> AsyncIterator[None]:
    cfg = app[keys.CONFIG].scrape
    routes = app[keys.ROUTES]
    session = app[keys.SESSION]

    def on_stats(worker, stats) -> None:
        # Bound the speculative index by the worker's real KV capacity.
        if stats.num_gpu_blocks:
            routes.route_of(worker).index.set_capacity(worker.url, stats.num_gpu_blocks)

    scraper = Scraper(session, cfg.timeout_s, app[keys.METRICS], on_stats)
    # One scrape before serving, so the KV block size is known for the first request.
    try:
        await asyncio.wait_for(scraper.once(routes.all_workers()), cfg.timeout_s + 1)
    except TimeoutError:  # each worker has its own timeout; this bounds start-up all the same
        log.warning("the first scrape of the workers' /metrics did not finish in %ss", cfg.timeout_s + 1)
    async for _ in _run_background(scraper.run(routes.all_workers, cfg.interval_s)):
        yield


async def _governor(app: web.Application) -> AsyncIterator[None]:
    """Governance: its store (Redis client), kill-switch poller and alert webhook sender."""
    governor = app.get(keys.GOVERNOR)
    if governor is None:
        yield
        return
    async for _ in _run_background(governor.background(app[keys.SESSION])):
        yield
    await governor.close()  # settles what is in flight, then closes the Redis client


async def _response_cache(app: web.Application) -> AsyncIterator[None]:
    """The response cache: the semantic cache's encoder loads and its Redis sync starts; at
    shutdown its Redis client closes (an in-process store is dropped)."""
    cache = app.get(keys.CACHE)
    if cache is not None:
        await cache.start()
    yield
    if cache is not None:
        await cache.close()


async def _telemetry(app: web.Application) -> AsyncIterator[None]:
    """Traces and prompt logs: opened at start-up; what is still queued is written out at
    shutdown (off the loop)."""
    telemetry = app[keys.TELEMETRY]
    await asyncio.get_running_loop().run_in_executor(None, telemetry.start)  # opens a file, starts threads
    yield
    await asyncio.get_running_loop().run_in_executor(None, app[keys.TELEMETRY].close)


async def _health_loop(app: web.Application) -> AsyncIterator[None]:
    cfg = app[keys.CONFIG].health
    checker = app[keys.HEALTH]
    routes = app[keys.ROUTES]
    session = app[keys.SESSION]
    async for _ in _run_background(checker.run(session, routes.all_workers, cfg.interval_s, cfg.timeout_s)):
        yield
