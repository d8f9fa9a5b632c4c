"""The request path as one straight line: parse -> govern -> choose tier -> choose worker
-> proxy -> account.

``ModelRoute`` holds what one model needs to route: its worker pool, policy, prefix index
and prefixer. ``run_request`` is the whole path; each stage is a short call into its own
module, so adding a stage (budgets, tiers) touches this file and the new module only.
A tiered model with ``mode: cascade`` takes one stage instead of choose-tier-and-proxy:
``router/cascade.py`` tries tiers cheapest first through ``forward_with_retry``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from kvroute.router import keys
from kvroute.router.config import ModelConfig, RouterConfig
from kvroute.router.errors import (
    InvalidRequest,
    ModelNotFound,
    NoHealthyWorker,
    UpstreamConnectionLost,
    UpstreamError,
)
from kvroute.router.fleet.workers import Worker, WorkerPool
from kvroute.router.index import PrefixIndex
from kvroute.router.kv_events import ExactIndex
from kvroute.router.policies.base import Policy, PolicyDeps, RequestContext
from kvroute.router.policies.registry import create_policy
from kvroute.router.prefix import Prefixer, PromptTokenizer
from kvroute.router.proxy import Dispatch, forward
from kvroute.router.requests import ParsedRequest
from kvroute.router.tiers import TierChooser, prompt_text

if TYPE_CHECKING:
    from kvroute.router.cascade import Cascade
    from kvroute.router.governance.governor import Grant

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 16  # used only until a worker reports its own
DEFAULT_MAX_TOKENS = 256
MAX_TOKENS_CLAMP = 4096
MAX_ATTEMPTS = 2  # one retry on another worker, only before the first byte


@dataclass
class ModelRoute:
    cfg: ModelConfig
    pool: WorkerPool
    policy: Policy
    index: PrefixIndex | ExactIndex
    prefixer: Prefixer

    @property
    def mode(self) -> str:
        """kv_events (exact, from vLLM's events), speculative, or approximate (no tokenizer)."""
        if not self.prefixer.exact:
            return "approximate"
        return "kv_events" if self.cfg.kv_events else "speculative"

    @property
    def block_size(self) -> int:
        if self.cfg.block_size:
            return self.cfg.block_size
        for w in self.pool.all():
            if w.block_size:
                return w.block_size
        return DEFAULT_BLOCK_SIZE


@dataclass
class ServedModel:
    """A model as clients name it: one pool, or tiers (cheapest first) and a chooser."""

    name: str
    tiers: list[ModelRoute]
    chooser: TierChooser | None = None
    cascade: Cascade | None = None  # mode: cascade (router/cascade.py)

    def tier(self, name: str) -> ModelRoute | None:
        return next((t for t in self.tiers if t.cfg.tier == name), None)

    def healthy(self) -> bool:
        return any(t.pool.healthy() for t in self.tiers)


class ModelRoutes:
    """All configured models by the name clients send, and their pools by key."""

    def __init__(self, cfg: RouterConfig, executor=None, metrics=None):
        self.by_name: dict[str, ServedModel] = {}
        self.by_key: dict[str, ModelRoute] = {}
        for m in cfg.models:
            pools = [self._pool(p, executor) for p in m.pools]
            chooser = None
            if m.classifier is not None:
                chooser = TierChooser(m.name, m.classifier, len(pools), executor, metrics)
            cascade = None
            if m.cascade is not None:
                from kvroute.router.cascade import Cascade

                cascade = Cascade(m.name, m.cascade, executor, metrics)
            self.by_name[m.name] = ServedModel(m.name, pools, chooser, cascade)

    def _pool(self, m: ModelConfig, executor) -> ModelRoute:
        if m.kv_events is not None:
            index = ExactIndex(m.kv_capacity_blocks, m.kv_events.speculative_ttl_s)
        else:
            index = PrefixIndex(m.kv_capacity_blocks)
        tokenizer = PromptTokenizer(m.tokenizer) if m.tokenizer else None
        if tokenizer is None:
            log.warning("model %s: no tokenizer configured, routing in APPROXIMATE mode "
                        "(character chunks, not KV blocks)", m.key)
        pool = WorkerPool(m.key, m.workers, tier=m.tier, api_key=m.api_key)
        policy = create_policy(m.policy, PolicyDeps(index=index), m.policy_options)
        pool.on_change(policy.on_workers_changed)
        route = ModelRoute(m, pool, policy, index, Prefixer(tokenizer, m.approx_chunk_chars, executor))
        self.by_key[m.key] = route
        return route

    def get(self, name: str) -> ServedModel:
        served = self.by_name.get(name)
        if served is None:
            raise ModelNotFound(f"The model '{name}' does not exist or is not served by this "
                                f"router. Available: {', '.join(self.by_name)}", param="model")
        return served

    def all_workers(self) -> Iterable[Worker]:
        for route in self.by_key.values():
            yield from route.pool.all()

    def route_of(self, worker: Worker) -> ModelRoute:
        return self.by_key[worker.model]

    def choosers(self) -> list[TierChooser]:
        return [s.chooser for s in self.by_name.values() if s.chooser is not None]

    def cascades(self) -> list[Cascade]:
        return [s.cascade for s in self.by_name.values() if s.cascade is not None]

    def apply_discovery(self, found: Iterable) -> None:
        """Replace every pool's members with what discovery sees (url, model, tier)."""
        members: dict[str, list[tuple[str, str | None]]] = {key: [] for key in self.by_key}
        for w in found:
            key = f"{w.model}/{w.tier}" if w.tier else w.model
            if key not in members:  # a plain model's pool also takes pods with a tier label
                key = w.model if w.model in members else None
            if key is None:
                log.debug("discovered worker %s serves unconfigured model %s", w.url, w.model)
                continue
            members[key].append((w.url, w.tier))
        for key, urls in members.items():
            self.by_key[key].pool.set_members(urls)


def expected_max_tokens(body: dict) -> int:
    value = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
    return max(1, min(int(value), MAX_TOKENS_CLAMP))


async def build_context(route: ModelRoute, req: ParsedRequest) -> RequestContext:
    pk = await route.prefixer.keys(req.body, route.block_size)
    session = req.headers.get("x-kvroute-session") or req.body.get("user")
    return RequestContext(
        model=route.cfg.name,
        block_keys=pk.block_keys,
        block_size=pk.block_size,
        prompt_tokens=pk.prompt_tokens,
        max_tokens=expected_max_tokens(req.body),
        session_key=session if isinstance(session, str) else None,
        headers=req.headers,
    )


def choose_worker(app: web.Application, route: ModelRoute, ctx: RequestContext,
                  exclude: set[str]) -> Worker:
    healthy = route.pool.healthy()
    candidates = tuple(w for w in healthy if w.url not in exclude) if exclude else healthy
    if not candidates:
        raise NoHealthyWorker(f"No healthy worker for model '{route.cfg.name}'; retry later.",
                              param="model")
    start = time.perf_counter()
    worker = route.policy.select(candidates, ctx) or candidates[0]
    app[keys.METRICS].decision.labels(route.cfg.name).observe(time.perf_counter() - start)
    return worker


async def choose_tier(app: web.Application, served: ServedModel, req: ParsedRequest) -> ModelRoute:
    forced = req.headers.get("x-kvroute-tier")
    if forced:
        route = served.tier(forced) if served.tiers[0].cfg.tier else None
        if route is None:
            valid = ", ".join(t.cfg.tier for t in served.tiers if t.cfg.tier) or "none"
            raise InvalidRequest(f"Unknown tier '{forced}' for model '{served.name}'; valid: {valid}",
                                 param="x-kvroute-tier")
    elif served.chooser is not None:
        index, _score = await served.chooser.choose(prompt_text(req.body))
        route = served.tiers[index]
    else:
        route = served.tiers[0]
    if route.cfg.tier:
        app[keys.METRICS].tier_requests.labels(served.name, route.cfg.tier).inc()
    return route


async def run_request(request: web.Request, req: ParsedRequest) -> web.StreamResponse:
    app = request.app
    served = app[keys.ROUTES].get(req.model)  # parse (done by the handler)
    if served.cascade is not None and not req.headers.get("x-kvroute-tier"):
        # cascade: choose tier -> try cheap -> keep or escalate, each try governed, proxied and accounted
        return await served.cascade.run(request, req, served, build_context, forward_with_retry)
    route = await choose_tier(app, served, req)
    ctx = await build_context(route, req)
    governor, grant, tries = app.get(keys.GOVERNOR), None, []
    if governor is not None:  # govern: keys, kill switch, loops, budgets (router/governance); may downgrade
        grant = await governor.admit(req, served, route, ctx, authorization=request.headers.get("Authorization"),
                                     rebuild=build_context)
        route, ctx, req = grant.route, grant.ctx, grant.req
    try:
        return await forward_with_retry(request, route, ctx, req, grant, tries)
    finally:
        if grant is not None:
            governor.finish(grant, tries[-1] if tries else None)  # settle to real usage, in the background


async def forward_with_retry(request: web.Request, route: ModelRoute, ctx: RequestContext, req: ParsedRequest,
                             grant: Grant | None, tries: list[Dispatch], **dispatch_options) -> web.StreamResponse:
    """choose worker -> proxy + account, with one retry on another worker before the first byte,
    and one more on the same worker if its connection was lost (it is up; its cache is there).

    Each attempt's ``Dispatch`` is appended to ``tries`` (the caller settles governance with the last).
    """
    app = request.app
    governor = app.get(keys.GOVERNOR)
    tried: set[str] = set()
    worker: Worker | None = None
    retried_same = False
    while True:
        if grant is not None:
            governor.check_kill(grant.attrs, route.cfg.name)  # before every upstream call
        if worker is None:
            worker = choose_worker(app, route, ctx, tried)
            tried.add(worker.url)
        dispatch = Dispatch(route=route, worker=worker, ctx=ctx, req=req, grant=grant, **dispatch_options)
        tries.append(dispatch)
        try:
            return await forward(request, dispatch)  # proxy + account
        except UpstreamError as exc:
            if isinstance(exc, UpstreamConnectionLost) and not retried_same and not dispatch.client_started:
                retried_same = True
                app[keys.METRICS].retries.labels(route.cfg.name).inc()
                log.warning("retrying %s request on %s after a lost connection: %s",
                            route.cfg.name, worker.url, exc.message)
                continue
            if not (exc.retryable and not dispatch.client_started and len(tried) < MAX_ATTEMPTS
                    and len(route.pool.healthy()) > 0):
                raise
            app[keys.METRICS].retries.labels(route.cfg.name).inc()
            log.warning("retrying %s request on another worker after %s: %s",
                        route.cfg.name, worker.url, exc.message)
            worker = None
