"""Active health checks and passive ejection.

Every ``interval_s`` each worker's ``GET /health`` is polled; 200 makes it routable. The
request path ejects a worker at once on a connect error (``eject``); the next good probe
brings it back. A worker that comes back may have restarted with an empty KV cache, so
its prefix-index entries are dropped on every state change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

import aiohttp

from kvroute.router.upstream.workers import Worker

log = logging.getLogger(__name__)


async def probe(session: aiohttp.ClientSession, worker: Worker, timeout_s: float) -> bool:
    try:
        # A redirect is not followed: requests would not follow it either (proxy.py).
        async with session.get(f"{worker.url}/health", headers=worker.upstream_headers,
                               timeout=aiohttp.ClientTimeout(total=timeout_s), allow_redirects=False) as resp:
            await resp.read()
            return resp.status == 200
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False


class HealthChecker:
    def __init__(self, on_state_change: Callable[[Worker], None]):
        self.on_state_change = on_state_change

    def set_state(self, worker: Worker, healthy: bool, reason: str | None = None) -> None:
        if worker.healthy == healthy:
            return
        worker.healthy = healthy
        worker.last_error = reason
        log.warning("worker %s is now %s%s", worker.url, "healthy" if healthy else "unhealthy",
                    f" ({reason})" if reason else "")
        self.on_state_change(worker)

    def eject(self, worker: Worker, reason: str) -> None:
        """Passive ejection from the request path (connect error, reset before first byte)."""
        self.set_state(worker, False, reason)

    async def check_all(self, session: aiohttp.ClientSession, workers: Iterable[Worker], timeout_s: float) -> None:
        workers = list(workers)
        results = await asyncio.gather(*(probe(session, w, timeout_s) for w in workers))
        for worker, ok in zip(workers, results):
            self.set_state(worker, ok, None if ok else "health check failed")

    async def run(self, session: aiohttp.ClientSession, workers_fn: Callable[[], Iterable[Worker]],
                  interval_s: float, timeout_s: float) -> None:
        while True:
            try:
                await self.check_all(session, workers_fn(), timeout_s)
            except Exception:  # never let the loop die
                log.exception("health loop iteration failed")
            await asyncio.sleep(interval_s)
