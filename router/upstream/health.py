"""Active health checks and passive ejection.

Every ``interval_s`` each worker's ``GET /health`` is polled; 200 makes it routable. The
request path ejects a worker at once on a connect error (``eject``); the next good probe
brings it back. A worker that comes back may have restarted with an empty KV cache, so
its prefix-index entries are dropped on every state change.

A worker must also serve the model it is configured for: its ``GET /v1/models`` is read
when it first answers (and again after it was down, or while it is wrong), and a worker
that lists other models is unhealthy, with the names in its ``last_error``: every request
to it would be the worker's 404. A worker with no readable model list is taken on trust.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

import aiohttp

from kvroute.router.upstream.workers import Worker

log = logging.getLogger(__name__)


async def served_models(session: aiohttp.ClientSession, worker: Worker, timeout_s: float) -> tuple[str, ...] | None:
    """The model ids the worker's ``/v1/models`` lists; None when it cannot be read."""
    try:
        async with session.get(f"{worker.url}/v1/models", headers=worker.upstream_headers, ssl=worker.ssl,
                               timeout=aiohttp.ClientTimeout(total=timeout_s), allow_redirects=False) as resp:
            if resp.status != 200:
                return None
            data = (await resp.json(content_type=None)).get("data")
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError, AttributeError):
        return None
    if not isinstance(data, list):
        return None
    return tuple(m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str))


async def probe(session: aiohttp.ClientSession, worker: Worker, timeout_s: float) -> str | None:
    """Why the worker's ``/health`` failed, for ``/health``'s ``last_error``; None when it is up."""
    try:
        # A redirect is not followed: requests would not follow it either (proxy.py).
        async with session.get(f"{worker.url}/health", headers=worker.upstream_headers, ssl=worker.ssl,
                               timeout=aiohttp.ClientTimeout(total=timeout_s), allow_redirects=False) as resp:
            await resp.read()
            return None if resp.status == 200 else f"health check failed: /health answered {resp.status}"
    except TimeoutError:
        return f"health check failed: no answer within {timeout_s:g}s"
    except aiohttp.ClientConnectorCertificateError as exc:  # the likeliest TLS mistake: say which
        return f"health check failed: TLS certificate not trusted ({exc.certificate_error}); see the pool's tls"
    except aiohttp.ServerDisconnectedError as exc:
        why = f"health check failed: {exc}"
        if worker.url.startswith("https://"):  # how a TLS 1.3 server refuses a caller with no certificate
            why += "; if the worker asks for a client certificate, set the pool's tls.cert_file and key_file"
        return why
    except (aiohttp.ClientError, OSError) as exc:
        return f"health check failed: {exc or type(exc).__name__}"


class HealthChecker:
    def __init__(self, on_state_change: Callable[[Worker], None],
                 served_name: Callable[[Worker], str] | None = None):
        """``served_name``: the model name the router sends a worker (its pool's
        ``upstream_model``); None: no model check."""
        self.on_state_change = on_state_change
        self.served_name = served_name

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
        wrong = await self._check_models(session, [w for w, why in zip(workers, results) if why is None], timeout_s)
        for worker, why in zip(workers, results):
            if why is not None:
                worker.models_read = False  # read again when it is back: it may have restarted
                self.set_state(worker, False, why)
            elif id(worker) in wrong:
                self.set_state(worker, False, wrong[id(worker)])
            else:
                self.set_state(worker, True)

    async def _check_models(self, session: aiohttp.ClientSession, up: list[Worker],
                            timeout_s: float) -> dict[int, str]:
        """Why each worker among ``up`` whose model list lacks its model is wrong, by id()."""
        if self.served_name is None:
            return {}
        name_of = self.served_name

        def lacks(w: Worker) -> bool:
            return w.served_models is not None and name_of(w) not in w.served_models

        todo = [w for w in up if not w.models_read or lacks(w)]  # a wrong one is read every round
        for worker, models in zip(todo, await asyncio.gather(*(served_models(session, w, timeout_s) for w in todo))):
            worker.served_models, worker.models_read = models, True
        wrong = {}
        for w in todo:
            if lacks(w):
                wrong[id(w)] = (f"serves {', '.join(map(repr, w.served_models or ())) or 'no model'}, not "
                                f"{name_of(w)!r}: set the model's upstream_model to one of those")
        return wrong

    async def run(self, session: aiohttp.ClientSession, workers_fn: Callable[[], Iterable[Worker]],
                  interval_s: float, timeout_s: float) -> None:
        while True:
            try:
                await self.check_all(session, workers_fn(), timeout_s)
            except Exception:  # never let the loop die
                log.exception("health loop iteration failed")
            await asyncio.sleep(interval_s)
