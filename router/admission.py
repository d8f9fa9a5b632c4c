"""Admission control and drain: how many completion requests this router serves at once.

Two bounds, both in ``server:``. ``max_in_flight`` counts the completion requests this
replica is serving, from admission (before the body is read) until the answer or stream
has ended. ``max_in_flight_per_worker`` counts this replica's requests on each worker; a
worker at it is not offered to the policy, which chooses among the others. Past a bound,
``overload: reject`` answers 503 at once, with Retry-After; ``overload: queue`` waits, first
come first served, at most ``queue_timeout_s`` and with at most ``max_queued`` requests
waiting (then the same 503). So memory is bounded at any load: at most ``max_in_flight``
bodies and streams, and ``max_queued`` waiters that hold no body yet.

Drain (``drain``, called by ``router/server.py`` on SIGTERM): nothing new is admitted (503
``shutting_down``, Retry-After, Connection: close), the queued are refused the same way, and
in-flight requests get ``drain_s`` to finish. Whatever still runs then is cut: a stream ends
with a final SSE error event, a request whose answer has not begun gets the 503.

The deadlines (queue timeout, drain grace) sleep on the injected clock, so tests move time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from kvroute.router.config import ServerConfig
from kvroute.router.errors import Overloaded, ShuttingDown, sse_error
from kvroute.router.governance.clock import Clock
from kvroute.router.metrics import RouterMetrics
from kvroute.router.routes import ModelRoute, ModelRoutes
from kvroute.router.upstream.workers import Worker

log = logging.getLogger(__name__)

# The SSE stream a completion request has started, if any: what a cut writes its last event to.
STREAM = web.RequestKey("kvroute_stream", web.StreamResponse)
# A cut request ends within a few loop turns (one last write); this only bounds a stuck client.
CUT_WAIT_S = 5.0

ROUTER, WORKER = "router", "worker"  # the bound a request waits on (metrics label "scope")


@dataclass(eq=False)  # one per request, kept in a set by identity
class _Ticket:
    """One admitted request; the drain cuts it through its timeout."""

    timeout: asyncio.Timeout | None = None
    cut: bool = False


class Admission:
    def __init__(self, cfg: ServerConfig, metrics: RouterMetrics, clock: Clock | None = None):
        self.cfg = cfg
        self._metrics = metrics
        self._clock = clock or Clock()
        self.in_flight = 0  # router slots taken, handed-over ones included
        self.draining = False
        self._queued = 0  # waiters in all queues (bounded by max_queued)
        self._router_queue: deque[asyncio.Future[bool]] = deque()
        self._worker_queues: dict[str, deque[asyncio.Future[bool]]] = {}  # by pool key
        # Per pool: slots handed to woken waiters that have not yet taken them, so a newcomer
        # does not take them first.
        self._handed: dict[str, int] = {}
        self._tickets: set[_Ticket] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        # Read at scrape time: nothing to update per request.
        metrics.admitted_in_flight.set_function(lambda: self.in_flight)
        metrics.queued.set_function(lambda: self._queued)

    # ---- the router bound: one slot per completion request ------------------------------

    async def serve(self, request: web.Request,
                    handler: Callable[[], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Admit the request (or raise 503), run ``handler``, and cut it if the drain ends first."""
        if self.draining:
            raise self._refused("shutting_down", ShuttingDown())
        if self.in_flight < self.cfg.max_in_flight and not self._router_queue:
            self.in_flight += 1
        else:  # a slot is handed over to us (in_flight already counts it), or 503
            await self._wait(self._router_queue, ROUTER, self._release_router_slot, Overloaded(
                f"The router is serving server.max_in_flight ({self.cfg.max_in_flight}) requests; "
                "retry later.", param="server.max_in_flight"))
            if self.draining:  # handed a slot just before the drain began, which did not count it
                self._release_router_slot()
                raise self._refused("shutting_down", ShuttingDown())
        ticket = _Ticket()
        self._tickets.add(ticket)
        self._idle.clear()
        try:
            async with asyncio.timeout(None) as ticket.timeout:
                return await handler()
        except TimeoutError:
            if not ticket.cut:
                raise
            return await self._end_cut(request)
        finally:
            self._tickets.discard(ticket)
            if not self._tickets:
                self._idle.set()
            self._release_router_slot()

    def _release_router_slot(self) -> None:
        while self._router_queue:
            waiter = self._router_queue.popleft()
            if not waiter.done():
                waiter.set_result(True)  # the slot passes to the first in line
                return
        self.in_flight -= 1

    # ---- the worker bound: the policy sees only workers under it ------------------------

    def under_bound(self, model: str, workers: tuple[Worker, ...]) -> tuple[Worker, ...]:
        """``workers`` less those at ``max_in_flight_per_worker``; 503 if that leaves none."""
        bound = self.cfg.max_in_flight_per_worker
        if bound is None or all(w.in_flight_requests < bound for w in workers):
            return workers  # the same tuple: policies may key caches on it
        free = tuple(w for w in workers if w.in_flight_requests < bound)
        if not free:
            raise self._refused("workers_busy", Overloaded(
                f"Every worker of model '{model}' is serving server.max_in_flight_per_worker ({bound}) "
                "requests; retry later.", param="server.max_in_flight_per_worker"))
        return free

    async def wait_for_worker(self, route: ModelRoute) -> None:
        """``overload: queue``: wait until a worker of ``route`` is under its bound (or none is
        healthy: the policy step says so). Under ``reject`` the policy step refuses instead."""
        if self.cfg.max_in_flight_per_worker is None or self.cfg.overload != "queue":
            return
        key = route.cfg.key
        queue = self._worker_queues.setdefault(key, deque())
        if not route.pool.healthy():
            return
        if self._room(route) > 0:
            if not queue:
                return
            self.worker_freed(route)  # a slot no waiter was woken for (capacity grew): theirs first

        def abandon() -> None:  # woken, but gone before taking the slot: pass it on
            self._handed[key] -= 1
            self.worker_freed(route)

        await self._wait(queue, WORKER, abandon, Overloaded(
            f"Every worker of model '{route.cfg.name}' is serving server.max_in_flight_per_worker "
            f"({self.cfg.max_in_flight_per_worker}) requests; retry later.",
            param="server.max_in_flight_per_worker"))
        self._handed[key] -= 1  # ours now: the caller chooses a worker before its next await

    def worker_freed(self, route: ModelRoute) -> None:
        """A request on ``route`` ended, or its workers changed: wake as many waiters as there
        are free slots."""
        queue = self._worker_queues.get(route.cfg.key)
        if not queue:
            return
        key = route.cfg.key
        room = self._room(route)
        while room > 0 and queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(True)
                self._handed[key] = self._handed.get(key, 0) + 1
                room -= 1

    def _room(self, route: ModelRoute) -> int:
        bound = self.cfg.max_in_flight_per_worker or 0
        free = sum(max(0, bound - w.in_flight_requests) for w in route.pool.healthy())
        return free - self._handed.get(route.cfg.key, 0)

    # ---- the queue ----------------------------------------------------------------------

    async def _wait(self, queue: deque[asyncio.Future[bool]], scope: str, abandon: Callable[[], None],
                    refusal: Overloaded) -> None:
        """Queue for a slot of one bound until it is handed over; 503 under ``reject``, when
        the queue is full, at its deadline or when the drain begins."""
        if self.cfg.overload != "queue":
            raise self._refused("over_limit" if scope == ROUTER else "workers_busy", refusal)
        if self._queued >= self.cfg.max_queued:
            refusal.message = f"{refusal.message} The overload queue is full (server.max_queued)."
            raise self._refused("queue_full", refusal)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        queue.append(waiter)
        self._queued += 1
        self._metrics.queued_total.labels(scope).inc()
        start = self._clock.time()
        timer = loop.create_task(self._clock.sleep(self.cfg.queue_timeout_s))
        timer.add_done_callback(lambda t: None if waiter.done() else waiter.set_result(False))
        try:
            handed = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None and waiter.result():
                abandon()  # handed a slot just as this request was cancelled
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                queue.remove(waiter)  # still queued: timed out, refused or cancelled
            self._queued -= 1
            self._metrics.queue_seconds.labels(scope).observe(max(0.0, self._clock.time() - start))
        if not handed:
            refusal.message = (f"{refusal.message} Waited server.queue_timeout_s "
                               f"({self.cfg.queue_timeout_s:g}s) in the overload queue.")
            raise self._refused("queue_timeout", refusal)

    def _refused(self, reason: str, err: Overloaded | ShuttingDown) -> Overloaded | ShuttingDown:
        self._metrics.refused.labels(reason).inc()
        return err

    # ---- readiness and drain --------------------------------------------------------------

    def ready(self, routes: ModelRoutes) -> tuple[bool, str]:
        """For ``GET /readyz``: serving, with at least one model able to route."""
        if self.draining:
            return False, "draining"
        if not any(served.healthy() for served in routes.by_name.values()):
            return False, "no model has a healthy worker"
        return True, "ready"

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop admitting, refuse the queued, give in-flight requests ``grace_s`` (default
        ``server.drain_s``) to finish, then cut what still runs."""
        grace = self.cfg.drain_s if grace_s is None else grace_s
        if not self.draining:
            self.draining = True
            self._metrics.draining.set(1)
            for queue in (self._router_queue, *self._worker_queues.values()):
                while queue:
                    waiter = queue.popleft()
                    if not waiter.done():
                        self._metrics.refused.labels("shutting_down").inc()
                        waiter.set_exception(ShuttingDown())
        if self._tickets:
            log.info("draining: %d requests in flight get up to %gs to finish (signal again to stop now)",
                     len(self._tickets), grace)
            await self._until_idle(grace)
        if self._tickets:
            log.warning("drain: cutting %d requests still running after %gs", len(self._tickets), grace)
            self.cut()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), CUT_WAIT_S)

    def cut(self) -> None:
        """End every in-flight request now: the drain's grace is over, or a second signal came."""
        now = asyncio.get_running_loop().time()
        for ticket in self._tickets:
            if ticket.timeout is not None and not ticket.cut:
                ticket.cut = True
                ticket.timeout.reschedule(now)

    async def _until_idle(self, timeout: float) -> None:
        idle = asyncio.ensure_future(self._idle.wait())
        timer = asyncio.ensure_future(self._clock.sleep(timeout))
        try:
            await asyncio.wait((idle, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            timer.cancel()

    async def _end_cut(self, request: web.Request) -> web.StreamResponse:
        self._metrics.drain_cut.inc()
        err = ShuttingDown(f"The router is shutting down: the request ran past server.drain_s "
                           f"({self.cfg.drain_s:g}s) and was cut; retry it.")
        stream = request.get(STREAM)
        if stream is None:
            raise err  # nothing sent yet: a plain 503
        # Mid-stream: a final SSE error event, as for a worker that fails mid-stream.
        with contextlib.suppress(ConnectionError, RuntimeError):
            await stream.write(sse_error(err, request.path))
            await stream.write_eof()
        return stream

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """``app.on_response_prepare``: remember a completion's SSE stream, for a cut's last event."""
        if response.content_type == "text/event-stream":
            request[STREAM] = response
