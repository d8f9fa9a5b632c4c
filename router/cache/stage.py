"""The response-cache stage of the request path: before tier choice and worker choice.

    decide (policy.py) -> bypass: on down the path, x-kvroute-cache: bypass
                       -> exact: key (tenant, model, tier header, canonical body) -> store.get
                          semantic (semantic.py): embed the last user turn -> nearest
                          stored turn of the same tenant and context -> check -> store.get
                          hit:  governance admits it (rate limits, loops, kill switch) and
                                settles it at zero tokens -> replay (replay.py)
                          miss: on down the path, watching the upstream call (tap.py) ->
                                store the complete answer (for each cache that missed)

An answer is stored only when the worker answered the request exactly as the client sent
it (governance did not shrink ``max_tokens`` or inject a message), completely (every choice
finished, no stream cut), with status 200. Store failures never fail a request.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web

from kvroute.router.cache import policy, replay
from kvroute.router.cache.policy import HEADER, Mode
from kvroute.router.cache.semantic import Probe, SemanticCache
from kvroute.router.cache.store import MemoryStore, Store, StoreDown, make_store
from kvroute.router.cache.tap import CAPTURE, Capture
from kvroute.router.config import RouterConfig
from kvroute.router.governance.budgets import Rates
from kvroute.router.governance.clock import Clock
from kvroute.router.governance.governor import Governor
from kvroute.router.metrics import RouterMetrics
from kvroute.router.requests import ParsedRequest
from kvroute.router.requests import authorization as authorization_of
from kvroute.router.routes import ServedModel

log = logging.getLogger(__name__)
STATUS = web.RequestKey("kvroute_cache_status", str)  # hit | miss | bypass, for on_response_prepare
EXACT, SEMANTIC = "exact", "semantic"
KIND_HEADER = "x-kvroute-cache-kind"  # on a hit: exact or semantic
SIMILARITY_HEADER = "x-kvroute-cache-similarity"  # on a semantic hit: the cosine similarity


class ResponseCache:
    def __init__(self, cfg: RouterConfig, metrics: RouterMetrics, governor: Governor | None = None,
                 clock: Clock | None = None, store: Store | None = None):
        assert cfg.cache is not None or store is not None
        self.metrics = metrics
        self.governor = governor
        if store is None:
            assert cfg.cache is not None
            store = make_store(cfg.cache.redis, cfg.cache.max_bytes, clock)
        self.store = store
        self.exact = {m.name: m.cache.exact for m in cfg.models if m.cache is not None and m.cache.exact}
        semantic = {m.name: m.cache.semantic for m in cfg.models if m.cache is not None and m.cache.semantic}
        self.semantic = SemanticCache(semantic, store, metrics, clock) if semantic else None

    def on(self, model: str) -> bool:
        return model in self.exact or (self.semantic is not None and model in self.semantic.cfgs)

    async def start(self) -> None:
        if self.semantic is not None:
            await self.semantic.start()

    async def serve(self, request: web.Request, req: ParsedRequest, served: ServedModel,
                    call_next: Callable[[], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        exact = self.exact.get(served.name)
        semantic = self.semantic.cfgs.get(served.name) if self.semantic is not None else None
        if exact is None and semantic is None:
            return await call_next()
        cache_control = request.headers.get("Cache-Control")
        exact_mode = policy.decide(req, cache_control, exact) if exact is not None else None
        semantic_mode = policy.decide(req, cache_control, semantic) if semantic is not None else None
        if exact_mode in (None, Mode.BYPASS) and semantic_mode in (None, Mode.BYPASS):
            for kind, mode in ((EXACT, exact_mode), (SEMANTIC, semantic_mode)):
                if mode is not None:
                    self._count(served, kind, "bypass")
            request[STATUS] = "bypass"
            return await call_next()
        namespace = self._namespace(request)
        key = None
        if exact_mode in (Mode.USE, Mode.REFRESH):
            key = policy.cache_key(namespace, served.name, req.headers.get("x-kvroute-tier"), req.body)
            if exact_mode is Mode.USE:
                entry = await self._get(key)
                if entry is not None:
                    return await self._hit(request, req, served, entry, EXACT)
        probe = None
        if semantic_mode in (Mode.USE, Mode.REFRESH):
            assert self.semantic is not None
            probe = await self.semantic.probe(req, served.name, namespace)
            if probe is not None and semantic_mode is Mode.USE:
                try:
                    found = await self.semantic.lookup(served.name, probe)
                except StoreDown:
                    self.metrics.cache_errors.labels("get").inc()
                    found = None
                if found is not None:
                    if exact_mode is not None:
                        self._count(served, EXACT, "miss" if key is not None else "bypass")
                    return await self._hit(request, req, served, found.entry, SEMANTIC, found.similarity)
        if exact_mode is not None:
            self._count(served, EXACT, "miss" if key is not None else "bypass")
        if semantic_mode is not None:
            self._count(served, SEMANTIC, "miss" if probe is not None else "bypass")
        if key is None and probe is None:  # semantic asked, but the turn cannot be embedded
            request[STATUS] = "bypass"
            return await call_next()
        request[STATUS] = "miss"
        async def store_stream() -> bool:  # a stream's answer, before its client sees the end
            raw = self._answer(req, served, None, capture)
            if raw is None:
                return False
            await self._store(served.name, key, probe, raw)
            return True

        capture = Capture(max(c.max_entry_bytes for c in (exact, semantic) if c is not None), store_stream)
        token = CAPTURE.set(capture)
        try:
            response = await call_next()
        finally:
            CAPTURE.reset(token)
        # Stored before the answer is returned: a client that asks again once it has the
        # answer gets a hit, on any replica. A stream was stored before its last bytes.
        if not capture.stored:
            raw = self._answer(req, served, response, capture)
            if raw is not None:
                await self._store(served.name, key, probe, raw)
        return response

    def _namespace(self, request: web.Request) -> str:
        """The tenant (401 for a bad key, as admission would), or the API key without governance."""
        authorization = authorization_of(request.headers)
        if self.governor is not None:
            return "tenant:" + self.governor.auth.tenant_of(authorization)
        return policy.api_key_namespace(authorization)

    def _count(self, served: ServedModel, kind: str, result: str) -> None:
        self.metrics.cache_requests.labels(served.name, kind, result).inc()

    async def _get(self, key: str) -> replay.Entry | None:
        try:
            raw = await self.store.get(key)
        except StoreDown:
            self.metrics.cache_errors.labels("get").inc()
            return None
        return replay.Entry.decode(raw) if raw is not None else None

    async def _hit(self, request: web.Request, req: ParsedRequest, served: ServedModel,
                   entry: replay.Entry, kind: str, similarity: float | None = None) -> web.StreamResponse:
        if self.governor is not None:
            # A hit is a request all the same: keys, kill switch, rate limits and the loop
            # detector see it. It reaches no worker, so it settles at zero tokens.
            route = served.tiers[0]
            ctx = await route.context(req)
            grant = await self.governor.admit(req, served, route, ctx,
                                              authorization=authorization_of(request.headers))
            self.governor.finish(grant, None)
        m = self.metrics
        m.cache_requests.labels(served.name, kind, "hit").inc()
        m.cache_saved_tokens.labels(served.name, kind).inc(entry.tokens)
        m.cache_saved_usd.labels(served.name, kind).inc(entry.usd)
        headers = {HEADER: "hit", KIND_HEADER: kind}
        if similarity is not None:
            headers[SIMILARITY_HEADER] = f"{similarity:.4f}"
        if entry.tier:
            headers["x-kvroute-tier"] = entry.tier
        if not req.stream:
            return web.Response(body=replay.json_body(entry), content_type="application/json", headers=headers)
        out = web.StreamResponse(status=200, headers={"content-type": "text/event-stream", "cache-control": "no-cache",
                                                      **headers})
        await out.prepare(request)
        with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):  # the client left
            for event in replay.sse_events(entry, req.wants_usage_chunk):
                await out.write(event)
            await out.write_eof()
        return out

    def _answer(self, req: ParsedRequest, served: ServedModel, response: web.StreamResponse | None,
                capture: Capture) -> bytes | None:
        """The encoded entry of a miss's answer, or None when it must not be stored.
        ``response`` None: a stream that has all its events and has not ended yet."""
        d = capture.dispatch
        if response is None:
            if d is None or d.failed is not None or not d.client_started:
                return None
        elif d is None or d.status != "ok" or d.failed is not None or response.status != 200:
            return None
        if d.meter is not None and d.meter.cut is not None:
            return None  # governance cut the answer
        capped = _without_max_tokens(d.req.body) == _without_max_tokens(req.body) and d.req.body != req.body
        if not capped and d.req.body != req.body:
            return None  # governance changed the request (a loop's injected message)
        if isinstance(response, web.Response):
            try:
                body = orjson.loads(response.body) if isinstance(response.body, bytes) else None
            except orjson.JSONDecodeError:
                return None
        elif served.judge is None and not capture.overflow:  # a cascade's stream is rebuilt by the cascade
            body = replay.assemble(req.kind, capture.events, d.usage)
        else:
            return None
        if not replay.complete(body):
            return None
        assert isinstance(body, dict)
        if capped and any(c.get("finish_reason") == "length" for c in body["choices"]):
            return None  # cut short by the max_tokens governance set, not the client's: another answer
        usage = body.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        details = usage.get("prompt_tokens_details")
        details = details if isinstance(details, dict) else {}
        usd = Rates.of(d.route.cfg.price).cost(_int(usage.get("prompt_tokens")), _int(details.get("cached_tokens")),
                                               _int(usage.get("completion_tokens")))
        return replay.Entry(req.kind, body, d.route.cfg.tier, usd).encode()

    async def _store(self, model: str, key: str | None, probe: Probe | None, raw: bytes) -> None:
        exact = self.exact.get(model)
        if key is not None and exact is not None and len(raw) <= exact.max_entry_bytes:
            try:
                await self.store.set(key, raw, exact.ttl_s)
            except StoreDown:
                self.metrics.cache_errors.labels("set").inc()
        if probe is not None and self.semantic is not None and len(raw) <= self.semantic.cfgs[model].max_entry_bytes:
            try:
                await self.semantic.add(model, probe, raw)
            except StoreDown:
                self.metrics.cache_errors.labels("set").inc()
        if isinstance(self.store, MemoryStore):
            self.metrics.cache_entries.labels(self.store.kind).set(len(self.store))
            self.metrics.cache_bytes.labels(self.store.kind).set(self.store.size)

    async def close(self) -> None:
        if self.semantic is not None:
            await self.semantic.close()
        await self.store.close()


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """``app.on_response_prepare``: every answer of a cached model says what the cache did."""
    status = request.get(STATUS)
    if status is not None and HEADER not in response.headers:
        response.headers[HEADER] = status


def _without_max_tokens(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("max_tokens", "max_completion_tokens")}


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
