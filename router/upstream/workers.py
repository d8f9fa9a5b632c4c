"""Worker state as the router sees it.

A ``Worker`` is one vLLM OpenAI server. Its fields are updated by three writers, all on
the event loop: the request path (in-flight accounting and its circuit breaker), the
health loop and the metrics scraper. Policies only read them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ssl import SSLContext

from kvroute.router.config import BreakerConfig
from kvroute.router.upstream.breaker import Breaker, State

log = logging.getLogger(__name__)


@dataclass
class Worker:
    url: str
    model: str
    tier: str | None = None
    _healthy: bool = field(default=True, repr=False)
    # The router's own accounting of requests it has sent and not yet seen finish.
    in_flight_requests: int = 0
    in_flight_tokens: int = 0  # uncached prefill + expected decode tokens of those requests
    # Scraped from the worker's /metrics (all router replicas' traffic, not only ours).
    vllm_running: int = 0
    vllm_waiting: int = 0
    kv_usage: float = 0.0
    block_size: int | None = None
    last_error: str | None = None
    # The model names its /v1/models lists, read by the health loop once it answers
    # (models_read); None: the list could not be read, and the worker is taken on trust.
    served_models: tuple[str, ...] | None = None
    models_read: bool = False
    # Sent on every call to the worker: its API key (vLLM --api-key), if it has one. Never logged.
    upstream_headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    # aiohttp's ssl= for an https:// worker: True checks it with the system's CAs; a pool's tls sets a context.
    ssl: SSLContext | bool = field(default=True, repr=False)
    # the owning pool's hook: its cached list of healthy workers is stale
    _on_health_change: Callable[[], None] | None = field(default=None, repr=False)
    # Opens after consecutive failures: no traffic, but the worker stays healthy (index kept).
    breaker: Breaker = field(default_factory=Breaker, repr=False, compare=False)
    scrape_failures: int = 0  # consecutive failed scrapes of its /metrics (logged on the first)
    left: bool = False  # no longer a member of its pool (requests sent before may still run)
    # Set by the pool when the worker leaves with requests in flight: runs once the last is accounted.
    _on_drained: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def healthy(self) -> bool:
        return self._healthy

    @healthy.setter
    def healthy(self, ok: bool) -> None:
        if ok != self._healthy:
            self._healthy = ok
            if self._on_health_change is not None:
                self._on_health_change()

    def request_accounted(self) -> None:
        """A request to this worker has ended and been accounted (metrics included). The
        last one of a worker that left its pool lets the pool's leave listeners run, so its
        metric series are removed after their final updates, not re-created by them."""
        if self._on_drained is not None and self.in_flight_requests == 0:
            callback, self._on_drained = self._on_drained, None
            callback()

    @property
    def queue_depth(self) -> int:
        """Requests queued or running, counting other replicas' traffic when we know it."""
        return max(self.in_flight_requests, self.vllm_running + self.vllm_waiting)

    def __hash__(self) -> int:  # workers are identified by URL
        return hash(self.url)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Worker) and other.url == self.url


class WorkerPool:
    """The workers of one model. Membership changes come from config or discovery."""

    def __init__(self, model: str, urls: Iterable[str] = (), tier: str | None = None, api_key: str | None = None,
                 *, breaker: BreakerConfig = BreakerConfig(), now: Callable[[], float] = time.monotonic,
                 ssl: SSLContext | bool = True):
        self.model = model  # the pool key: "model" or "model/tier"
        # One dict, shared by the pool's workers: a new key (set_api_key) reaches them all.
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.api_key = api_key
        self._ssl = ssl
        self._workers: dict[str, Worker] = {}
        self._healthy: tuple[Worker, ...] | None = None
        self._probe_due: float | None = None  # the earliest open breaker's end of cooldown
        self._breaker = breaker
        self._now = now
        self._listeners: list[Callable[[list[Worker]], None]] = []
        self._breaker_listeners: list[Callable[[Worker], None]] = []
        self._join_listeners: list[Callable[[Worker], None]] = []
        self._leave_listeners: list[Callable[[Worker], None]] = []
        for u in urls:
            self._add(u, tier)

    def all(self) -> list[Worker]:
        return list(self._workers.values())

    def set_api_key(self, api_key: str | None) -> None:
        """A rotated worker key (SIGHUP): sent from the next call on."""
        self.api_key = api_key
        self._headers.clear()
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def set_ssl(self, ssl: SSLContext | bool) -> None:
        """New TLS settings (renewed certificates) for every call from now on, joiners too."""
        self._ssl = ssl
        for w in self._workers.values():
            w.ssl = ssl

    def healthy(self) -> tuple[Worker, ...]:
        """The routable workers: healthy, with a breaker that admits traffic. The same tuple
        until membership, health or a breaker changes, so a request does not pay for a walk
        over the fleet (and policies may key caches on it); while a breaker is open, one
        clock read per call sees its cooldown end."""
        if self._probe_due is not None and self._now() >= self._probe_due:
            self._probe_due = None
            for w in self._workers.values():
                w.breaker.poll()  # open -> half-open; its hook makes the tuple stale
            self._healthy = None
        if self._healthy is None:
            workers = self._workers.values()
            self._healthy = tuple(w for w in workers if w.healthy and w.breaker.admits)
            due = [t for w in workers if (t := w.breaker.probe_at) is not None]
            self._probe_due = min(due) if due else None
        return self._healthy

    def _stale(self) -> None:
        self._healthy = None

    def _add(self, url: str, tier: str | None) -> None:
        worker = Worker(url=url, model=self.model, tier=tier, upstream_headers=self._headers, ssl=self._ssl,
                        _on_health_change=self._stale, breaker=Breaker(self._breaker, self._now))
        worker.breaker.on_change = lambda: self._breaker_changed(worker)
        self._workers[url] = worker
        self._stale()

    def _breaker_changed(self, worker: Worker) -> None:
        self._stale()
        state = worker.breaker.state
        if state is State.OPEN:
            log.warning("worker %s: circuit breaker open for %gs", worker.url, worker.breaker.cooldown_s)
        elif state is State.CLOSED:
            log.info("worker %s: circuit breaker closed", worker.url)
        for listener in self._breaker_listeners:
            listener(worker)

    def on_breaker_change(self, listener: Callable[[Worker], None]) -> None:
        """Called with the worker whenever its breaker changes state (or starts or ends a probe)."""
        self._breaker_listeners.append(listener)

    def get(self, url: str) -> Worker | None:
        return self._workers.get(url)

    def on_change(self, listener: Callable[[list[Worker]], None]) -> None:
        """Called with the members whenever membership changes."""
        self._listeners.append(listener)

    def on_join(self, listener: Callable[[Worker], None]) -> None:
        """Called with each worker that joins by ``set_members`` (after ``on_change``'s listeners)."""
        self._join_listeners.append(listener)

    def on_leave(self, listener: Callable[[Worker], None]) -> None:
        """Called with each worker that left, once it has no request in flight: at once, or
        when its last request has been accounted (``Worker.request_accounted``)."""
        self._leave_listeners.append(listener)

    def set_members(self, members: Iterable[tuple[str, str | None]]) -> None:
        """Replace membership with (url, tier) pairs, keeping state of workers that stay."""
        wanted = dict(members)
        left: list[Worker] = []
        joined: list[Worker] = []
        for url in list(self._workers):
            if url not in wanted:
                gone = self._workers.pop(url)
                gone._on_health_change = gone.breaker.on_change = None
                gone.left = True
                left.append(gone)
                self._stale()
        for url, tier in wanted.items():
            if url not in self._workers:
                self._add(url, tier)
                joined.append(self._workers[url])
            else:
                self._workers[url].tier = tier
        if left or joined:
            for listener in self._listeners:
                listener(self.all())
        for worker in joined:
            for on_join in self._join_listeners:
                on_join(worker)
        for worker in left:
            if worker.in_flight_requests:
                worker._on_drained = lambda worker=worker: self._left(worker)
            else:
                self._left(worker)

    def _left(self, worker: Worker) -> None:
        for on_leave in self._leave_listeners:
            on_leave(worker)
