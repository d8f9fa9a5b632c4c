"""Worker state as the router sees it.

A ``Worker`` is one vLLM OpenAI server. Its fields are updated by three writers, all on
the event loop: the request path (in-flight accounting), the health loop and the metrics
scraper. Policies only read them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field


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
    # Sent on every call to the worker: its API key (vLLM --api-key), if it has one. Never logged.
    upstream_headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    # the owning pool's hook: its cached list of healthy workers is stale
    _on_health_change: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def healthy(self) -> bool:
        return self._healthy

    @healthy.setter
    def healthy(self, ok: bool) -> None:
        if ok != self._healthy:
            self._healthy = ok
            if self._on_health_change is not None:
                self._on_health_change()

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

    def __init__(self, model: str, urls: Iterable[str] = (), tier: str | None = None, api_key: str | None = None):
        self.model = model  # the pool key: "model" or "model/tier"
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._workers: dict[str, Worker] = {}
        self._healthy: tuple[Worker, ...] | None = None
        self._listeners: list[Callable[[list[Worker]], None]] = []
        for u in urls:
            self._add(u, tier)

    def all(self) -> list[Worker]:
        return list(self._workers.values())

    def healthy(self) -> tuple[Worker, ...]:
        """The routable workers. The same tuple until membership or health changes, so a
        request does not pay for a walk over the fleet (and policies may key caches on it)."""
        if self._healthy is None:
            self._healthy = tuple(w for w in self._workers.values() if w.healthy)
        return self._healthy

    def _stale(self) -> None:
        self._healthy = None

    def _add(self, url: str, tier: str | None) -> None:
        self._workers[url] = Worker(url=url, model=self.model, tier=tier, upstream_headers=self._headers,
                                    _on_health_change=self._stale)
        self._stale()

    def get(self, url: str) -> Worker | None:
        return self._workers.get(url)

    def on_change(self, listener: Callable[[list[Worker]], None]) -> None:
        self._listeners.append(listener)

    def set_members(self, members: Iterable[tuple[str, str | None]]) -> None:
        """Replace membership with (url, tier) pairs, keeping state of workers that stay."""
        wanted = dict(members)
        changed = False
        for url in list(self._workers):
            if url not in wanted:
                self._workers.pop(url)._on_health_change = None
                self._stale()
                changed = True
        for url, tier in wanted.items():
            if url not in self._workers:
                self._add(url, tier)
                changed = True
            else:
                self._workers[url].tier = tier
        if changed:
            for listener in self._listeners:
                listener(self.all())
