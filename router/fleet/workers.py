"""Worker state as the router sees it.

A ``Worker`` is one vLLM OpenAI server. Its fields are updated by three writers, all on
the event loop: the request path (in-flight accounting), the health loop and the metrics
scraper. Policies only read them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass
class Worker:
    url: str
    model: str
    tier: str | None = None
    healthy: bool = True
    # The router's own accounting of requests it has sent and not yet seen finish.
    in_flight_requests: int = 0
    in_flight_tokens: int = 0  # uncached prefill + expected decode tokens of those requests
    # Scraped from the worker's /metrics (all router replicas' traffic, not only ours).
    vllm_running: int = 0
    vllm_waiting: int = 0
    kv_usage: float = 0.0
    block_size: int | None = None
    last_error: str | None = None

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

    def __init__(self, model: str, urls: Iterable[str] = (), tier: str | None = None):
        self.model = model  # the pool key: "model" or "model/tier"
        self._workers: dict[str, Worker] = {u: Worker(url=u, model=model, tier=tier) for u in urls}
        self._listeners: list[Callable[[list[Worker]], None]] = []

    def all(self) -> list[Worker]:
        return list(self._workers.values())

    def healthy(self) -> list[Worker]:
        return [w for w in self._workers.values() if w.healthy]

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
                del self._workers[url]
                changed = True
        for url, tier in wanted.items():
            if url not in self._workers:
                self._workers[url] = Worker(url=url, model=self.model, tier=tier)
                changed = True
            else:
                self._workers[url].tier = tier
        if changed:
            for listener in self._listeners:
                listener(self.all())
