"""Stored responses (OpenAI's Responses API): which worker holds each one.

A vLLM worker started with ``VLLM_ENABLE_RESPONSES_API_STORE=1`` keeps the responses it
makes (``store``, true by default) in its own memory. A follow-up that names one
(``previous_response_id``), ``GET /v1/responses/{id}`` and ``POST
/v1/responses/{id}/cancel`` must reach that worker: anywhere else they are a 404. It also
holds the conversation's KV cache, so it is the cheapest worker for the follow-up too.

The router remembers the worker of each response it relayed (the newest ``LIMIT``). An id
it does not know, made through another replica or process or before a restart, is looked
up by asking every healthy worker at once (``GET /v1/responses/{id}``): the one that
answers 200 holds it; an id none holds is not asked for again for ``MISSING_TTL_S``.

A response's tenant (with governance) is remembered with it, and another tenant's request
for it is a 404; one found by asking the workers has no tenant on record, and its id, 128
random bits, is what guards it, as in OpenAI's API.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp

from kvroute.router.metrics import RouterMetrics
from kvroute.router.routes import ModelRoute, ModelRoutes
from kvroute.router.upstream.workers import Worker

log = logging.getLogger(__name__)

LIMIT = 100_000  # ids remembered; about 270 bytes each with the id, 27 MB when full
LOOKUP_TIMEOUT_S = 5.0
# An id no worker held is not asked for again this soon: a client repeating unknown ids
# must not turn each request into a call to every worker.
MISSING_TTL_S = 10.0
MISSING_LIMIT = 10_000


@dataclass(frozen=True)
class Holder:
    route: ModelRoute
    worker: Worker


@dataclass(frozen=True)
class _Entry:
    route_key: str
    url: str
    owner: str | None  # the tenant that made it; None: not known


class StoredResponses:
    def __init__(self, routes: ModelRoutes, metrics: RouterMetrics, limit: int = LIMIT,
                 now: Callable[[], float] = time.monotonic):
        self._routes = routes
        self._lookups = metrics.stored_lookups
        self._limit = limit
        self._now = now
        self._held: OrderedDict[str, _Entry] = OrderedDict()
        self._missing: OrderedDict[str, float] = OrderedDict()  # id -> when the workers were asked

    def remember(self, response_id: str, route: ModelRoute, worker: Worker, owner: str | None) -> None:
        self._held[response_id] = _Entry(route.cfg.key, worker.url, owner)
        self._held.move_to_end(response_id)
        if len(self._held) > self._limit:
            self._held.popitem(last=False)

    async def find(self, session: aiohttp.ClientSession, response_id: str, owner: str | None) -> Holder | None:
        """The worker that holds ``response_id``, if ``owner`` may see it; None: no worker
        the router knows of holds it (or another tenant made it)."""
        holder, result = await self._find(session, response_id, owner)
        self._lookups.labels(result).inc()
        return holder

    async def _find(self, session: aiohttp.ClientSession, response_id: str,
                    owner: str | None) -> tuple[Holder | None, str]:
        entry = self._held.get(response_id)
        if entry is not None:
            if entry.owner is not None and entry.owner != owner:
                return None, "other_tenant"
            route = self._routes.by_key.get(entry.route_key)
            worker = route.pool.get(entry.url) if route is not None else None
            if route is not None and worker is not None:
                return Holder(route, worker), "recorded"
            del self._held[response_id]  # its worker left the pool, and its memory with it
            return None, "missing"
        asked = self._missing.get(response_id)
        if asked is not None and self._now() - asked < MISSING_TTL_S:
            return None, "missing"
        holder = await self._ask_workers(session, response_id)
        if holder is not None:
            self._missing.pop(response_id, None)
            self.remember(response_id, holder.route, holder.worker, None)
            return holder, "asked"
        self._missing[response_id] = self._now()
        self._missing.move_to_end(response_id)
        if len(self._missing) > MISSING_LIMIT:
            self._missing.popitem(last=False)
        return None, "missing"

    async def _ask_workers(self, session: aiohttp.ClientSession, response_id: str) -> Holder | None:
        candidates = list(_healthy(self._routes.by_key.values()))
        if not candidates:
            return None
        found = await asyncio.gather(*(_holds(session, w, response_id) for _, w in candidates))
        for (route, worker), yes in zip(candidates, found):
            if yes:
                return Holder(route, worker)
        return None


def _healthy(routes: Iterable[ModelRoute]) -> Iterable[tuple[ModelRoute, Worker]]:
    seen: set[str] = set()
    for route in routes:
        for worker in route.pool.healthy():
            if worker.url not in seen:  # a worker in two pools (one server, two names) is asked once
                seen.add(worker.url)
                yield route, worker


async def _holds(session: aiohttp.ClientSession, worker: Worker, response_id: str) -> bool:
    try:
        async with session.get(f"{worker.url}/v1/responses/{response_id}", headers=worker.upstream_headers,
                               ssl=worker.ssl, timeout=aiohttp.ClientTimeout(total=LOOKUP_TIMEOUT_S)) as resp:
            await resp.read()
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.debug("asking %s for response %s: %s", worker.url, response_id, exc)
        return False

