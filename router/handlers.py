"""HTTP handlers and the error middleware."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from kvroute.router import cascade, keys, pipeline
from kvroute.router.errors import (
    InvalidRequest,
    KvrouteError,
    ModelNotFound,
    NotFound,
    UpstreamStatusError,
    error_body,
)
from kvroute.router.governance.api import add_governance_routes
from kvroute.router.proxy import relay_as_is
from kvroute.router.requests import (
    ALIASES,
    CHAT,
    COMPLETION,
    PATHS,
    RESPONSE_ID,
    ParsedRequest,
    check_headers,
    parse_request,
    read_body,
    request_id,
)
from kvroute.router.routes import ServedModel

log = logging.getLogger(__name__)
_LOGGED = frozenset({*PATHS.values(), *ALIASES})  # API routes outside /v1/ (vLLM's /tokenize, /rerank...) too


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Turn every failure into an OpenAI-style error body; never crash the router."""
    request[keys.REQUEST_ID] = request_id(request.headers)  # on every answer (on_response_prepare)
    try:
        check_headers(request.headers)  # the headers the router reads, before anything reads them
        return await handler(request)
    except UpstreamStatusError as exc:
        request.app[keys.METRICS].errors.labels("upstream_status").inc()
        request[keys.ERROR_CODE] = "upstream_status"
        return web.Response(status=exc.status, body=exc.body, content_type=exc.content_type.split(";")[0],
                            headers=exc.headers)  # a worker's Retry-After reaches the client
    except KvrouteError as exc:
        request.app[keys.METRICS].errors.labels(exc.code or exc.type).inc()
        request[keys.ERROR_CODE] = exc.code or exc.type
        resp = web.json_response(error_body(exc, request.path), status=exc.status, headers=exc.headers)
        if exc.close_connection:
            resp.force_close()
        return resp
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err = KvrouteError(exc.reason or "HTTP error", code=str(exc.status))
        err.status, err.type = exc.status, "invalid_request_error"
        request[keys.ERROR_CODE] = str(exc.status)
        return web.json_response(error_body(err, request.path), status=exc.status)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        request.app[keys.METRICS].errors.labels("internal").inc()
        request[keys.ERROR_CODE] = "internal"
        return web.json_response(error_body(KvrouteError("Internal router error"), request.path), status=500)


@web.middleware
async def access_log_middleware(request: web.Request, handler) -> web.StreamResponse:
    """One access-log line per API request (``telemetry.access_log``), with the status the
    client got; outside the error middleware, so errors are logged as answered."""
    if not request.path.startswith("/v1/") and request.path not in _LOGGED:
        return await handler(request)  # probes and scrapes: not logged
    started, status = time.perf_counter(), 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:  # the client hung up: mid-stream it had a 200, else nothing
        rec = request.get(keys.RECORD)
        status = 200 if rec is not None and rec.tries and rec.tries[-1].client_started else 499  # nginx's code
        raise
    finally:
        request.app[keys.TELEMETRY].log_access(request.method, request.path, status, started,
                                               request.get(keys.REQUEST_ID), request.get(keys.RECORD),
                                               request.get(keys.ERROR_CODE), request.remote, request.headers)


async def _completion(request: web.Request, kind: str) -> web.StreamResponse:
    request[keys.ARRIVED] = time.perf_counter()  # kvroute_router_added_seconds starts here
    # Admitted (or 503) before the body is read: at most server.max_in_flight bodies in memory.
    return await request.app[keys.ADMISSION].serve(request, lambda: _admitted_completion(request, kind))


async def _admitted_completion(request: web.Request, kind: str) -> web.StreamResponse:
    cfg = request.app[keys.CONFIG]
    raw = await read_body(request, cfg.server.max_body_bytes)
    req = parse_request(kind, raw, request.headers, request[keys.REQUEST_ID])
    served = request.app[keys.ROUTES].get(req.model)
    telemetry = request.app[keys.TELEMETRY]
    record = request[keys.RECORD] = telemetry.begin(req)  # the server span; the stages report into it
    status, error = 500, None  # type: int, BaseException | None
    try:
        cache = request.app.get(keys.CACHE)
        if cache is not None:  # the response cache answers or passes on, before tier and worker choice
            response = await cache.serve(request, req, served, lambda: _route(request, req, served))
        else:
            response = await _route(request, req, served)
        status = response.status
        record.cache_hit = response.headers.get("x-kvroute-cache-kind")  # exact or semantic, on a hit
        return response
    except KvrouteError as exc:
        status, error = exc.status, exc
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        try:
            telemetry.end(record, status, error)  # span attributes, histograms, prompt log
        except Exception:  # observability never costs a request its answer
            log.exception("telemetry failed for a %s request", req.model)


async def _route(request: web.Request, req: ParsedRequest, served: ServedModel) -> web.StreamResponse:
    req = pipeline.isolated(request, req)  # governance.isolate_kv_cache: the tenant's cache_salt
    if served.judge is not None and req.kind in (CHAT, COMPLETION) and not req.headers.get("x-kvroute-tier"):
        return await cascade.run(request, req, served)  # cheap tier first, escalate when unsure
    return await pipeline.run_request(request, req, served)


def _api(kind: str):
    """The handler of one request API (``requests.PATHS``): all of them take the same path."""
    async def handler(request: web.Request) -> web.StreamResponse:
        return await _completion(request, kind)

    handler.__name__ = kind
    return handler


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "kvroute"}


async def list_models(request: web.Request) -> web.Response:
    routes = request.app[keys.ROUTES]
    data = [_model_card(name) for name, served in routes.by_name.items() if served.healthy()]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}`` (the openai client's ``models.retrieve``): the model, when
    it is served and has a healthy worker, as ``/v1/models`` lists it."""
    name = request.match_info["model"]
    served = request.app[keys.ROUTES].by_name.get(name)
    if served is None or not served.healthy():
        raise ModelNotFound(f"The model '{name}' does not exist or has no healthy worker on this router.",
                            param="model")
    return web.json_response(_model_card(name))


async def health(request: web.Request) -> web.Response:
    routes = request.app[keys.ROUTES]
    models = {}
    for name, served in routes.by_name.items():
        tiers = [_pool_health(route) for route in served.tiers]
        if len(tiers) == 1 and not served.tiers[0].cfg.tier:
            models[name] = tiers[0]
        else:
            chooser = served.chooser
            models[name] = {"tiers": tiers, "healthy_workers": sum(t["healthy_workers"] for t in tiers),
                            "classifier": chooser and {"version": chooser.version,
                                                       "thresholds": list(chooser.thresholds)
                                                       if chooser.scorer else None}}
    ok = all(m["healthy_workers"] for m in models.values())
    return web.json_response({"status": "ok" if ok else "degraded", "models": models})


async def livez(request: web.Request) -> web.Response:
    """Kubernetes liveness: the process is up and its event loop answers (draining too)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Kubernetes readiness: 200 while serving with at least one model able to route; 503
    while draining (SIGTERM) or when no model has a healthy worker."""
    ready, why = request.app[keys.ADMISSION].ready(request.app[keys.ROUTES])
    return web.json_response({"status": why}, status=200 if ready else 503)


def _pool_health(route) -> dict:
    return {
        "tier": route.cfg.tier,
        "index": route.index_kind,
        "policy": route.cfg.policy,
        "block_size": route.block_size,
        "healthy_workers": len(route.pool.healthy()),
        "index_entries": len(route.index),
        "workers": [
            {"url": w.url, "healthy": w.healthy, "last_error": w.last_error, "in_flight": w.in_flight_requests,
             "index_blocks": route.index.blocks_of(w.url), "breaker": w.breaker.state.name.lower()}
            for w in route.pool.all()
        ],
    }


async def metrics(request: web.Request) -> web.Response:
    body = request.app[keys.METRICS].render()
    return web.Response(body=body, headers={"content-type": "text/plain; version=0.0.4; charset=utf-8"})


async def not_found(request: web.Request) -> web.Response:
    raise NotFound(f"Unknown route: {request.method} {request.path}")


async def stored_response(request: web.Request) -> web.StreamResponse:
    """``GET /v1/responses/{id}`` and ``POST /v1/responses/{id}/cancel``, on the worker
    that holds the response (router/stored_responses.py)."""
    return await request.app[keys.ADMISSION].serve(request, lambda: _stored_response(request))


async def _stored_response(request: web.Request) -> web.StreamResponse:
    app, response_id = request.app, request.match_info["id"]
    if not RESPONSE_ID.fullmatch(response_id):
        raise NotFound(f"Response with id '{response_id[:64]}' not found.", param="response_id")
    holder = await app[keys.STORED_RESPONSES].find(app[keys.SESSION], response_id, pipeline.owner(request))
    if holder is None:
        raise NotFound(f"Response with id '{response_id}' not found: no worker of this router holds it (vLLM "
                       "stores responses only with VLLM_ENABLE_RESPONSES_API_STORE=1).", param="response_id")
    return await relay_as_is(request, app[keys.SESSION], holder.worker, request.path, request[keys.REQUEST_ID])


async def method_not_allowed(request: web.Request) -> web.Response:
    err = InvalidRequest(f"Method {request.method} not allowed on {request.path}")
    err.status = 405
    raise err


def add_routes(app: web.Application) -> None:
    for path, kind in {**{p: k for k, p in PATHS.items()}, **ALIASES}.items():  # every API vLLM serves
        app.router.add_post(path, _api(kind))
    app.router.add_get("/v1/responses/{id}", stored_response)
    app.router.add_post("/v1/responses/{id}/cancel", stored_response)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)  # ids may hold slashes (org/name)
    for path in (*PATHS.values(), *ALIASES):
        app.router.add_route("*", path, method_not_allowed)
    app.router.add_get("/health", health)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    add_governance_routes(app, keys.GOVERNOR)  # spend and admin APIs (router/governance/api.py)
    app.router.add_route("*", "/v1/{tail:.*}", not_found)
