"""The request path as one straight line: parse -> govern -> choose tier -> choose worker
-> proxy -> account.

The handler parses the request (``requests.py``) and calls ``run_request``. A model in
``mode: cascade`` takes ``cascade.run`` instead, which tries tiers cheapest first. Both
send every upstream try through the same ``attempt``:

    attempt = context -> govern (admit) -> choose worker -> proxy + account -> settle

Each stage is a short call into its own module: ``routes.py`` (what a model is),
``governance/`` (budgets, keys, kill switch), ``policies/`` (which worker), ``proxy.py``
(one upstream call and its metrics). Governance meets the proxy only through the grant's
stream meter (``proxy.StreamMeter``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field, replace

from aiohttp import web

from kvroute.router import keys
from kvroute.router.cache import tap as cache_tap
from kvroute.router.errors import BudgetExceeded, InvalidRequest, NoHealthyWorker, NotFound, UpstreamError
from kvroute.router.governance.grant import Grant
from kvroute.router.policies.base import RequestContext
from kvroute.router.proxy import Dispatch, forward
from kvroute.router.requests import (
    CHAT,
    CHAT_BATCH,
    CLASSIFY,
    COHERE_CHAT,
    COMPLETION,
    EMBEDDING,
    GENERATE,
    GENERATIVE_SCORING,
    MESSAGES,
    NO_PREFILL,
    ONE_TOKENIZER,
    POOL,
    POOLING,
    REQUEST_ID,
    RESPONSES,
    ParsedRequest,
    authorization,
)
from kvroute.router.routes import ModelRoute, ServedModel
from kvroute.router.routing_table import ROUTE_RULE, RouteRule
from kvroute.router.stored_responses import Holder
from kvroute.router.telemetry import RequestRecord
from kvroute.router.tiers import prompt_text
from kvroute.router.upstream.workers import Worker

log = logging.getLogger(__name__)


async def run_request(request: web.Request, req: ParsedRequest, served: ServedModel) -> web.StreamResponse:
    """A plain or tiered model: choose the tier, then one attempt."""
    holder = await previous_response(request, req, served) if req.continues_stored else None
    if holder is not None:  # only the worker that stored the conversation can continue it
        if (record := request.get(keys.RECORD)) is not None:
            record.on_tier(holder.route.cfg.tier, None, "previous_response")
        return (await attempt(request, served, holder.route, req, may_downgrade=False, pin=holder.worker)).response
    rule = None
    if not req.headers.get("x-kvroute-tier"):  # a forced tier wins over the routing table
        rule = route_rule(request, req, served)
        if rule is not None:
            request[ROUTE_RULE] = rule.name  # for traces and logs
            if rule.to_model:
                served = request.app[keys.ROUTES].get(rule.to_model)
    route = await choose_tier(served, req, record=request.get(keys.RECORD), rule=rule)
    # Token ids are one tier's tokenizer's: a budget refuses such a request rather than move it.
    return (await attempt(request, served, route, req, may_downgrade=req.kind not in ONE_TOKENIZER)).response


async def previous_response(request: web.Request, req: ParsedRequest, served: ServedModel) -> Holder:
    """The route and worker that hold a Responses request's ``previous_response_id``
    (router/stored_responses.py); 404 when no worker holds it."""
    previous = req.body["previous_response_id"]
    app = request.app
    holder = await app[keys.STORED_RESPONSES].find(app[keys.SESSION], previous, owner(request))
    if holder is None:
        raise NotFound(f"Response with id '{previous}' not found: no worker of this router holds it (vLLM "
                       "stores responses only with VLLM_ENABLE_RESPONSES_API_STORE=1).",
                       param="previous_response_id")
    if holder.route not in served.tiers:
        raise InvalidRequest(f"Response '{previous}' was made by model '{holder.route.cfg.name}', "
                             f"not '{served.name}'.", param="model")
    return holder


# What the classifier does not read: requests that are no question (pooling, token counts,
# renders), token ids (one tier's tokenizer's: a generate request's prompt, a generative
# scoring request's labels), and a batch of conversations (one tier for all of them).
_UNCLASSIFIED = POOLING | NO_PREFILL | ONE_TOKENIZER | {CHAT_BATCH}

# What vLLM takes a cache_salt on: every API that prefills a prompt but score and rerank.
SALTED = frozenset({CHAT, COMPLETION, RESPONSES, MESSAGES, EMBEDDING, CLASSIFY, POOL, GENERATE, CHAT_BATCH,
                    GENERATIVE_SCORING})


def isolated(request: web.Request, req: ParsedRequest) -> ParsedRequest:
    """``governance.isolate_kv_cache``: the request with its tenant's ``cache_salt`` (a
    client's own salt kept inside it), so vLLM shares no cached block between tenants; its
    keys start from that salt too (router/prefix.py)."""
    governor = request.app.get(keys.GOVERNOR)
    if governor is None or not governor.cfg.isolate_kv_cache:
        return req
    if req.kind == COHERE_CHAT:  # vLLM reads no cache_salt there: its blocks would be every tenant's
        raise InvalidRequest("This router keeps tenants' KV caches apart (governance.isolate_kv_cache), and vLLM's "
                             "Cohere chat API takes no cache_salt: send the chat to /v1/chat/completions.")
    if req.kind not in SALTED:
        return req
    tenant = hashlib.sha256(f"kvroute-tenant\0{owner(request)}".encode()).hexdigest()[:32]
    client = req.body.get("cache_salt")
    return replace(req, body={**req.body, "cache_salt": f"{tenant}:{client}" if client else tenant})


def owner(request: web.Request) -> str | None:
    """The caller's tenant with governance (401 for a bad key), for stored responses."""
    governor = request.app.get(keys.GOVERNOR)
    return governor.auth.tenant_of(authorization(request.headers)) if governor is not None else None


def route_rule(request: web.Request, req: ParsedRequest, served: ServedModel) -> RouteRule | None:
    """The routing table's rule for this request (``router/routing_table.py``), if one matches."""
    table = request.app[keys.CONFIG].routes
    if not table.rules:
        return None
    models = request.app[keys.ROUTES].by_name
    tiers_of = {name: tuple(t.cfg.tier for t in m.tiers if t.cfg.tier) for name, m in models.items()}
    return table.match(served.name, req.headers, tiers_of)


@dataclass
class Attempt:
    """One governed, proxied, accounted upstream try (retries inside it included)."""

    response: web.StreamResponse
    grant: Grant | None
    tries: list[Dispatch] = field(default_factory=list)

    @property
    def usage(self) -> dict | None:
        return self.tries[-1].usage if self.tries else None


async def attempt(request: web.Request, served: ServedModel, route: ModelRoute, req: ParsedRequest, *,
                  after: Grant | None = None, may_downgrade: bool = True, pin: Worker | None = None,
                  **dispatch_options) -> Attempt:
    """govern -> choose worker -> proxy + account -> settle, for one tier.

    ``after``: the grant of an earlier try of the same request (a cascade escalating),
    reserved again at this tier's price without a second loop check. ``may_downgrade``
    False: a budget that would move the try to a cheaper tier refuses it instead. ``pin``: the
    only worker that may take it (a stored response's), retried on no other.
    ``dispatch_options`` go to the proxy's ``Dispatch`` (the cascade's headers and usage).
    """
    app = request.app
    ctx = await route.context(req)
    governor, grant = app.get(keys.GOVERNOR), None
    if governor is not None:  # keys, kill switch, loops, budgets; may shrink max_tokens or downgrade
        if after is None:
            grant = await governor.admit(req, served, route, ctx, authorization=authorization(request.headers))
        else:
            grant = await governor.admit_escalation(after, served, route, ctx)
        if grant.route is not route and not may_downgrade:
            governor.finish(grant, None)
            raise BudgetExceeded(f"A budget refused tier '{route.cfg.tier}'.")
        if (record := request.get(keys.RECORD)) is not None:
            record.on_grant(grant, downgraded=grant.route is not route)
        route, ctx, req = grant.route, grant.ctx, grant.req
    if route.cfg.tier:
        app[keys.METRICS].tier_requests.labels(served.name, route.cfg.tier).inc()
    tries: list[Dispatch] = []
    admission = app[keys.ADMISSION]
    try:
        await admission.wait_for_worker(route)  # overload: queue, all at server.max_in_flight_per_worker
        response = await _proxy_with_retry(request, route, ctx, req, grant, tries, dispatch_options, pin)
        return Attempt(response, grant, tries)
    finally:
        admission.worker_freed(route)  # its slot on the worker may go to a queued request
        if governor is not None and grant is not None:
            governor.finish(grant, tries[-1] if tries else None)  # settle to real usage, in the background


async def choose_tier(served: ServedModel, req: ParsedRequest, *,
                      record: RequestRecord | None = None, rule: RouteRule | None = None) -> ModelRoute:
    """The tier a client forced (``x-kvroute-tier``), else the routing table's (``rule``), else
    the classifier's, else the first. ``record``: the request's telemetry, told the tier, the
    classifier's score and why."""
    forced = req.headers.get("x-kvroute-tier")
    if forced:
        route = served.tier(forced) if served.tiers[0].cfg.tier else None
        if route is None:
            valid = ", ".join(t.cfg.tier for t in served.tiers if t.cfg.tier) or "none"
            raise InvalidRequest(f"Unknown tier '{forced}' for model '{served.name}'; valid: {valid}",
                                 param="x-kvroute-tier")
        if record is not None:
            record.on_tier(route.cfg.tier, None, "header")
        return route
    if rule is not None and rule.tier is not None:
        route = served.tier(rule.tier)
        if route is not None:
            if record is not None:
                record.on_tier(route.cfg.tier, None, "routes")
            return route
    if served.chooser is not None and req.kind not in _UNCLASSIFIED:
        index, score = await served.chooser.choose(prompt_text(req.prompt_view))
        if record is not None:
            record.on_tier(served.tiers[index].cfg.tier, score, "classifier")
        return served.tiers[index]
    return served.tiers[0]


def _remember_response(request: web.Request, route: ModelRoute, req: ParsedRequest):
    """For a Responses request the worker stores (``store`` is true by default): record which
    worker holds the answer's id, for the requests that will name it."""
    if req.kind != RESPONSES or req.body.get("store") is False:
        return None
    stored, tenant = request.app[keys.STORED_RESPONSES], owner(request)
    return lambda response_id, worker: stored.remember(response_id, route, worker, tenant)


def choose_worker(app: web.Application, route: ModelRoute, ctx: RequestContext, exclude: set[str]) -> Worker:
    healthy = route.pool.healthy()
    candidates = tuple(w for w in healthy if w.url not in exclude) if exclude else healthy
    if not candidates:
        raise NoHealthyWorker(f"No healthy worker for model '{route.cfg.name}'; retry later.",
                              param="model")
    candidates = app[keys.ADMISSION].under_bound(route.cfg.name, candidates)  # server.max_in_flight_per_worker
    start = time.perf_counter()
    worker = route.policy.select(candidates, ctx) or candidates[0]
    app[keys.METRICS].decision.labels(route.cfg.name).observe(time.perf_counter() - start)
    return worker


def _choose_worker_traced(app: web.Application, route: ModelRoute, ctx: RequestContext, exclude: set[str],
                          record: RequestRecord | None) -> Worker:
    if record is None:
        return choose_worker(app, route, ctx, exclude)
    with record.choosing_worker(route.cfg.name, route.cfg.policy, route.index_kind) as out:
        start = time.perf_counter()
        worker = choose_worker(app, route, ctx, exclude)
        out.update(worker=worker.url, decision_s=time.perf_counter() - start, candidates=len(route.pool.healthy()))
    return worker


async def _proxy_with_retry(request: web.Request, route: ModelRoute, ctx: RequestContext, req: ParsedRequest,
                            grant: Grant | None, tries: list[Dispatch], options: dict,
                            pin: Worker | None = None) -> web.StreamResponse:
    """choose worker -> proxy + account, tried again before the first byte as the retry
    table says (``router/retry.py``): on another worker, or once on the same worker after a
    lost connection (it is up; its cache is there), within the pool's retry budget and the
    request's overall deadline (``server.request_timeout_s``)."""
    app = request.app
    metrics = app[keys.METRICS]
    retry = route.retry
    loop = asyncio.get_running_loop()
    deadline = loop.time() + app[keys.CONFIG].server.request_timeout_s
    retry.on_request()
    tried: set[str] = set()
    worker: Worker | None = None
    lost_before = False
    record = request.get(keys.RECORD)
    remember = _remember_response(request, route, req)
    while True:
        if worker is None and pin is not None:
            if pin not in route.pool.healthy():  # down, or its circuit breaker open
                raise NoHealthyWorker(f"The worker that holds response '{req.body['previous_response_id']}' "
                                      f"({pin.url}) is not taking requests; retry later.",
                                      param="previous_response_id")
            worker = pin
        elif worker is None:
            worker = _choose_worker_traced(app, route, ctx, tried, record)
        tried.add(worker.url)
        dispatch = Dispatch(route=route, worker=worker, ctx=ctx, req=req, meter=grant, deadline=deadline,
                            arrived_at=request.pop(keys.ARRIVED, None),  # the first try's only
                            on_response_id=remember and (lambda rid, w=worker: remember(rid, w)), **options)
        tries.append(dispatch)
        cache_tap.watch(dispatch)  # a cacheable miss: the response cache copies the answer (router/cache)
        try:
            if record is None:
                return await forward(request, dispatch)  # proxy + account
            with record.upstream(dispatch):  # a client span per try; its context goes to the worker
                return await forward(request, dispatch)
        except UpstreamError as exc:
            decision = retry.decide(
                # an ejected worker (another request found it refusing) gets no same-worker retry
                exc, client_started=dispatch.client_started, tries=len(tries),
                lost_before=lost_before or not worker.healthy,
                has_other=pin is None and any(w.url not in tried for w in route.pool.healthy()),
                remaining_s=deadline - loop.time())
            if not decision.again:
                if decision.refused is not None:
                    metrics.retries_refused.labels(route.cfg.name, decision.refused).inc()
                raise
            metrics.retries.labels(route.cfg.name).inc()
            log.warning("retrying %s request %s on %s in %.3fs after %s failed (%s): %s", route.cfg.name,
                        req.headers.get(REQUEST_ID, "-"), "the same worker" if decision.same_worker
                        else "another worker", decision.delay_s, worker.url,
                        decision.rule.failure if decision.rule else "?", exc.message)
            if decision.same_worker:
                lost_before = True
            else:
                worker = None
            if decision.delay_s > 0:
                await retry.clock.sleep(decision.delay_s)  # backoff, or the worker's Retry-After
