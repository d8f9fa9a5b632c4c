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
for it is a 404. With ``governance.redis`` the records are shared: each one is written to
Redis as the answer is relayed, so every replica and ``--procs`` process finds its worker
and its tenant there, without asking the workers. One found only by asking the workers
(made before the router started recording, or while Redis was down) has no tenant on
record, and its id, 128 random bits, is what guards it, as in OpenAI's API.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp
import orjson

from kvroute.router.governance.config import RedisConfig
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


class SharedRecords:
    """The records in Redis, one key per response id. A failing Redis costs only what it
    saves: each replica goes on with its own records and asks the workers."""

    TTL_S = 7 * 86400  # vLLM keeps a response until the worker restarts

    def __init__(self, redis: RedisConfig) -> None:
        from kvroute.router.governance.redis_store import redis_client

        self.client = redis_client(redis)
        self.prefix = f"{redis.prefix}:resp"
        self.failing = False
        self._writes: set[asyncio.Task] = set()

    def put(self, response_id: str, entry: _Entry) -> None:
        task = asyncio.get_running_loop().create_task(self._put(response_id, entry))
        self._writes.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._writes.discard)

    async def _put(self, response_id: str, entry: _Entry) -> None:
        from redis.exceptions import RedisError

        value = orjson.dumps([entry.route_key, entry.url, entry.owner])
        try:
            await self.client.set(f"{self.prefix}:{response_id}", value, ex=self.TTL_S)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
        else:
            self._answered()

    async def get(self, response_id: str) -> _Entry | None:
        from redis.exceptions import RedisError

        try:
            value = await self.client.get(f"{self.prefix}:{response_id}")
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return None
        self._answered()
        if value is None:
            return None
        route_key, url, owner = orjson.loads(value)
        return _Entry(route_key, url, owner)

    def _failed(self, exc: BaseException) -> None:
        if not self.failing:
            log.warning("stored responses: Redis failed (%s); each replica goes on with its own records", exc)
        self.failing = True

    def _answered(self) -> None:
        if self.failing:
            log.warning("stored responses: Redis answers again")
        self.failing = False

    async def close(self) -> None:
        await asyncio.gather(*self._writes, return_exceptions=True)
        await self.client.aclose()


class StoredResponses:
    def __init__(self, routes: ModelRoutes, metrics: RouterMetrics, limit: int = LIMIT,
                 now: Callable[[], float] = time.monotonic, redis: RedisConfig | None = None):
        self._routes = routes
        self.shared = SharedRecords(redis) if redis is not None else None
        self._lookups = metrics.stored_lookups
        self._limit = limit
        self._now = now
        self._held: OrderedDict[str, _Entry] = OrderedDict()
        self._missing: OrderedDict[str, float] = OrderedDict()  # id -> when the workers were asked

    def remember(self, response_id: str, route: ModelRoute, worker: Worker, owner: str | None) -> None:
        entry = _Entry(route.cfg.key, worker.url, owner)
        self._keep(response_id, entry)
        if self.shared is not None:
            self.shared.put(response_id, entry)

    def _keep(self, response_id: str, entry: _Entry) -> None:
        self._held[response_id] = entry
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
        entry, result = self._held.get(response_id), "recorded"
        if entry is None and self.shared is not None:
            entry, result = await self.shared.get(response_id), "shared"
            if entry is not None:
                self._keep(response_id, entry)
        if entry is not None:
            if entry.owner is not None and entry.owner != owner:
                return None, "other_tenant"
            holder = self._holder(entry)
            if holder is not None:
                return holder, result
            del self._held[response_id]  # its worker left the pool, and its memory with it
            return None, "missing"
        asked = self._missing.get(response_id)
        if asked is not None and self._now() - asked < MISSING_TTL_S:
            return None, "missing"
        holder = await self._ask_workers(session, response_id)
        if holder is not None and self.shared is not None:
            # Relayed by another replica a moment ago, its record may have landed while the
            # workers were asked: its tenant counts.
            entry = await self.shared.get(response_id)
            if entry is not None:
                self._keep(response_id, entry)
                if entry.owner is not None and entry.owner != owner:
                    return None, "other_tenant"
        if holder is not None:
            self._missing.pop(response_id, None)
            if response_id not in self._held:
                self._keep(response_id, _Entry(holder.route.cfg.key, holder.worker.url, None))
            return holder, "asked"
        self._missing[response_id] = self._now()
        self._missing.move_to_end(response_id)
        if len(self._missing) > MISSING_LIMIT:
            self._missing.popitem(last=False)
        return None, "missing"

    def _holder(self, entry: _Entry) -> Holder | None:
        route = self._routes.by_key.get(entry.route_key)
        worker = route.pool.get(entry.url) if route is not None else None
        return Holder(route, worker) if route is not None and worker is not None else None

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()

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

