"""The ``Governor``: the one object the request path talks to about money.

    grant = await governor.admit(req, served, route, ctx, authorization=...)
    try:
        ... proxy, with grant.on_stream_event(chunk) between stream chunks ...
    finally:
        governor.finish(grant, dispatch)

``admit`` authenticates the caller, tags the request (deriving a session when it names
none, ``identity.derive_session``), checks the kill switch, the rate limits
(``ratelimit.py``) and the session's loop detector, and reserves prompt tokens + the completion tokens it grants in
every budget the request falls under (atomically, in the store). It may shrink the
request's ``max_tokens`` to what the budgets leave, move it to a cheaper tier
(``downgrade``), delay it (``throttle``), or refuse it with a kvroute error (401, 429,
503). ``finish`` never raises and never awaits: it hands the grant to a background task
that settles the reservation to the real usage (the response's ``usage``, or the prompt
plus the tokens streamed so far when a stream was cut or the client left), records the
spend, and raises alerts. A grant is settled exactly once; a grant that is never settled
frees its reservation after ``reservation_ttl_s``.

Every store call goes through a ``GuardedStore`` (``guard.py``), which fails fast while the
store is down. Then ``governance.on_store_error.budgets`` decides: ``fail_closed`` refuses
the request (503 ``governance_unavailable``); ``fail_open`` admits it with nothing reserved
and no loop check, capped only by the request budgets (they need no state), counts it
(``kvroute_governance_actions_total{action="fail_open"}``, a log line at most every
``FAIL_OPEN_LOG_EVERY_S``), and settles it best-effort when it finishes: its usage is
charged to its budgets and the ledger if the store answers by then, and is lost for them
(not queued) if not. A reserve whose reply timed out may still run once the store answers;
its reservation is taken back (``release_orphans``) rather than left to hold budget room
for ``reservation_ttl_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from dataclasses import replace
from typing import Any

import aiohttp
import orjson

from kvroute.router.errors import (
    AgentHalted,
    BudgetExceeded,
    GovernanceUnavailable,
    KvrouteError,
    LoopDetected,
    StoreUnavailable,
)
from kvroute.router.governance import loops, ratelimit
from kvroute.router.governance.alerts import Alerter
from kvroute.router.governance.budgets import Rates, applicable, refusal, request_cap, slots_for
from kvroute.router.governance.clock import Clock
from kvroute.router.governance.config import Budget, GovernanceConfig, Tenant
from kvroute.router.governance.grant import Grant
from kvroute.router.governance.guard import GuardedStore
from kvroute.router.governance.identity import (
    Attribution,
    Authenticator,
    attribution,
    derive_session,
    key_id,
    new_traceparent,
    trace_id,
)
from kvroute.router.governance.killswitch import KillSwitch
from kvroute.router.governance.ledger import Ledger
from kvroute.router.governance.store import Ask, Granted, MemoryStore, Store
from kvroute.router.metrics import RouterMetrics
from kvroute.router.policies.base import RequestContext
from kvroute.router.requests import ParsedRequest
from kvroute.router.routes import ModelRoute, ServedModel

FAIL_OPEN_LOG_EVERY_S = 10.0
MAX_ORPHANS = 10_000  # beyond this, reserves that timed out are left to expire on their own
log = logging.getLogger(__name__)
spend_log = logging.getLogger("kvroute.spend")


def _label(value: str | None, allowed: tuple[str, ...] | None) -> str:
    if not value:
        return "none"
    return value if allowed and value in allowed else "other"


async def _nothing() -> None:
    return None


class Governor:
    def __init__(self, cfg: GovernanceConfig, metrics: RouterMetrics, clock: Clock | None = None,
                 store: Store | None = None):
        self.cfg = cfg
        self.metrics = metrics
        self.clock = clock or Clock()
        if store is None:
            if cfg.redis is not None:
                from kvroute.router.governance.redis_store import RedisStore

                store = RedisStore.from_url(cfg.redis.url, cfg.redis.prefix, cfg.redis.password,
                                            connect_timeout_s=cfg.redis.connect_timeout_s,
                                            timeout_s=cfg.redis.timeout_s)
            else:
                store = MemoryStore()
        self.store = store  # the backend itself, for tests and inspection; governance calls go through:
        self.guarded = GuardedStore(store, metrics, self.clock)
        self.fail_open = cfg.on_store_error.budgets == "fail_open"
        self.auth = Authenticator(cfg)
        self.kill = KillSwitch(cfg.kill_switch, self.guarded, self.clock,
                               fail_open=cfg.on_store_error.kill_switch == "fail_open")
        self.alerts = Alerter(cfg.alerts, self.guarded, self.clock, metrics)
        self.ledger = Ledger(self.guarded)
        self.pending: set[asyncio.Task] = set()
        self._tenants = {t.name for t in cfg.tenants} | {"anonymous"}
        # rid -> (budget keys, reservation expiry): reserves that timed out, to take back
        self._orphans: dict[str, tuple[tuple[str, ...], float]] = {}
        self._unlogged_open = 0  # fail_open admissions since the last log line
        self._open_logged_at = -1e18

    def set_keys(self, tenants: tuple[Tenant, ...], admin_keys: tuple[str, ...]) -> None:
        """New API keys (SIGHUP, router/reload.py): a rotated or revoked key takes effect on
        the next request. Budgets, limits and everything else keep their configuration."""
        self.cfg = replace(self.cfg, tenants=tenants, admin_keys=admin_keys)
        self.auth = Authenticator(self.cfg)
        self._tenants = {t.name for t in tenants} | {"anonymous"}

    # ---- admission -------------------------------------------------------------------

    async def admit(self, req: ParsedRequest, served: ServedModel, route: ModelRoute, ctx: RequestContext, *,
                    authorization: str | None) -> Grant:
        try:
            tenant = self.auth.tenant_of(authorization)
        except KvrouteError:
            self._action("unauthorized")
            raise
        headers = dict(req.headers)
        client_trace = trace_id(headers.get("traceparent"))
        if client_trace is None:
            headers["traceparent"] = new_traceparent()
        kid = key_id(authorization)
        session = ctx.session_key
        source: str | None = "header" if req.headers.get("x-kvroute-session") else "user"
        if not session:
            session, source = derive_session(self.cfg.session_id.derive, client_trace, kid, tenant,
                                             req.prompt_view)
        attrs = attribution(tenant, headers, session, kid=kid, source=source)
        await self.kill.maybe_refresh()  # a store fault is the kill switch's own business (on_store_error)
        if self.kill.unverified:
            raise GovernanceUnavailable("The kill switch's shared state could not be read since this router "
                                        "started; retry later.")
        self.check_kill(attrs, served.name)
        # The rate-limit window and the loop detector's recent list are independent store
        # calls: made at once, they cost one round trip to Redis, not two. A rate-limit
        # refusal wins; the request still counts in the session's recent list, as every
        # attempt does.
        limited, looped = await asyncio.gather(
            self._rate_limit(attrs, served.name, req, ctx) if self.cfg.rate_limits else _nothing(),
            self._loops_guarded(attrs, req.body, req.prompt_view), return_exceptions=True)
        for outcome in (limited, looped):
            if isinstance(outcome, BaseException):
                raise outcome
        body, delay = looped if isinstance(looped, tuple) else (req.body, 0.0)
        req = replace(req, headers=headers, body=body)
        grant = await self._reserve(req, served, route, ctx, attrs)
        for (budget, _slot), r in zip(grant.budgets, grant.reserved.ratios):
            if budget.action == "throttle" and r >= budget.throttle_at:
                delay = max(delay, budget.throttle_delay_s)
        if delay:
            self._action("throttle")
            try:
                await self.clock.sleep(delay)
            except BaseException:
                self.finish(grant, None)
                raise
        return grant

    async def admit_escalation(self, first: Grant, served: ServedModel, route: ModelRoute,
                               ctx: RequestContext) -> Grant:
        """Another try of an admitted request on another tier (router/cascade.py): same attribution,
        its own reservation at that tier's price, settled on its own; no second loop check."""
        self.check_kill(first.attrs, served.name)
        return await self._reserve(first.req, served, route, ctx, first.attrs)

    def check_kill(self, attrs: Attribution, model: str) -> None:
        hit = self.kill.check(attrs.tenant, attrs.agent, model)
        if hit is not None:
            self._action("kill_switch")
            key, entry = hit
            raise AgentHalted(f"Halted by the kill switch ({key}): {entry['reason']}", param=key)

    async def _rate_limit(self, attrs: Attribution, model: str, req: ParsedRequest, ctx: RequestContext) -> None:
        slots = ratelimit.slots_for(self.cfg.rate_limits, attrs, model)
        if not slots:
            return
        tokens = ctx.prompt_tokens + self._completion_asked(req)
        now = self.clock.time()
        try:
            got = await self.guarded.rate_take(slots, uuid.uuid4().hex, tokens, now)
        except StoreUnavailable:
            if not self.fail_open:
                raise
            return  # fail_open: no rate limits until the store is back
        if not got.ok:
            assert got.failed is not None
            self._action("rate_limit")
            raise ratelimit.refusal(slots[got.failed], got, tokens, now)

    async def _loops_guarded(self, attrs: Attribution, body: dict, view: dict) -> tuple[dict, float]:
        """The loop check of a session's request (``view``: its prompt, ``req.prompt_view``);
        none without a session, or while the store is down with ``on_store_error.budgets: fail_open``."""
        if not attrs.session:
            return body, 0.0
        try:
            return await self._loops(attrs, body, view)
        except StoreUnavailable:
            if not self.fail_open:
                raise
            return body, 0.0  # fail_open: the recent requests live in the store; no check until it is back

    def _session_ttl(self, attrs: Attribution) -> float:
        return self.cfg.session_id.ttl_s if attrs.derived_session else self.cfg.session_ttl_s

    @staticmethod
    def _restart_hint(attrs: Attribution) -> str:
        if attrs.session_source == "trace":
            return "start a new trace (traceparent) or name a session (x-kvroute-session)"
        if attrs.session_source == "fingerprint":
            return "change the conversation's opening or name a session (x-kvroute-session)"
        return "start a new session"

    async def _loops(self, attrs: Attribution, body: dict, view: dict) -> tuple[dict, float]:
        lc = self.cfg.loops
        who = f"{attrs.tenant}/{attrs.session}"
        halt_flag = f"halt:{who}"
        ttl = self._session_ttl(attrs)
        entries, halted = await self.guarded.push_recent(f"loop:{who}", loops.signature(view), lc.window,
                                                          ttl, self.clock.time(), halt_flag)
        if halted:
            self._action("loop_halt")
            raise LoopDetected(f"Session '{attrs.session}' was halted because it was looping; "
                               f"{self._restart_hint(attrs)}.", param="x-kvroute-session")
        why = loops.is_loop(entries, lc.window, lc.ratio)
        if why is None:
            return body, 0.0
        if await self.alerts.once(f"loopalert:{who}", ttl):
            self.alerts.emit("loop_detected", tenant=attrs.tenant, agent=attrs.agent, feature=attrs.feature,
                             session=attrs.session, session_source=attrs.session_source, reason=why,
                             action=lc.action)
        if lc.action == "halt":
            await self.guarded.set_flag(halt_flag, ttl, self.clock.time())
            self._action("loop_halt")
            raise LoopDetected(f"Session '{attrs.session}' is looping ({why} in {lc.window} requests in a "
                               f"row) and was halted; {self._restart_hint(attrs)}.", param="x-kvroute-session")
        self._action(f"loop_{lc.action}")
        if lc.action == "inject":
            return loops.inject(body, lc.message), 0.0
        if lc.action == "throttle":
            return body, lc.throttle_delay_s
        return body, 0.0

    def prompt_reserve(self, route: ModelRoute, ctx: RequestContext) -> int:
        """Prompt tokens to reserve: exact with a tokenizer, else the chars / 4 estimate times
        ``estimate_factor`` (settlement charges the worker's exact count either way)."""
        if route.prefixer.exact:
            return ctx.prompt_tokens
        return math.ceil(ctx.prompt_tokens * self.cfg.estimate_factor)

    def _completion_asked(self, req: ParsedRequest) -> int:
        """Completion tokens to reserve: the request's ``max_tokens`` (else ``default_max_tokens``)
        for each sequence it asks for (``n``, a batch's prompts); 0 for embeddings and token counts."""
        return (self.cfg.default_max_tokens if req.max_tokens is None else req.max_tokens) * req.sequences

    async def _reserve(self, req: ParsedRequest, served: ServedModel, route: ModelRoute, ctx: RequestContext,
                       attrs: Attribution) -> Grant:
        requested = self._completion_asked(req)
        need = min(self.cfg.min_completion_tokens * req.sequences, requested)
        now = self.clock.time()
        budgets = applicable(self.cfg.budgets, attrs)
        pairs = slots_for(budgets, attrs, now, self.cfg.session_ttl_s, self.cfg.session_id.ttl_s)
        early_done: set[str] = set()  # each budget's downgrade_at moves a request one tier down
        while True:
            rates = Rates.of(route.cfg.price)
            prompt = self.prompt_reserve(route, ctx)
            cap, req_budget = request_cap(budgets, attrs, prompt, rates)
            got = None
            refused: Budget
            if cap < need:
                assert req_budget is not None  # cap is finite only under a request budget
                refused, reason = req_budget, "tokens" if req_budget.limits.tokens else "usd"
            else:
                rid = uuid.uuid4().hex
                ask = Ask(rid, tuple(s for _, s in pairs), prompt, int(min(requested, cap)), need,
                          rates.input, rates.output, now, self.cfg.reservation_ttl_s)
                try:
                    got = await self.guarded.reserve(ask)
                except StoreUnavailable as exc:
                    if exc.sent:
                        self._orphan(ask)
                    if not self.fail_open:
                        raise  # 503 governance_unavailable: refuse rather than spend blind
                    return self._unreserved(attrs, served, route, req, ctx, pairs, ask)
                early = self._early_downgrade(pairs, got, served, route, early_done) if got.ok else None
                if early is not None:  # a downgrade budget is past its downgrade_at: give this tier's room back
                    early_done.add(early.name)
                    await self._give_back(ask)
                    route = self._switch(early, served, route, "downgrade_at")
                    ctx = await route.context(req)
                    continue
                if got.ok:
                    binding = None
                    if got.completion < requested:
                        binding = req_budget if cap <= got.completion else (
                            pairs[got.failed][0] if got.failed is not None else None)
                    return self._grant(rid, attrs, served, route, req, ctx, pairs, got, binding)
                assert got.failed is not None  # a refused reservation names its budget
                refused, reason = pairs[got.failed][0], got.reason or "tokens"
            cheaper = self._cheaper(served, route) if refused.action == "downgrade" else None
            if cheaper is None:
                self._action("reject")
                message, retry_after = refusal(refused, reason, now, got.reset_at if got is not None else None)
                raise BudgetExceeded(message, param=refused.name, retry_after_s=retry_after)
            route = self._switch(refused, served, route, "full")
            ctx = await route.context(req)

    def _early_downgrade(self, pairs, got: Granted, served: ServedModel, route: ModelRoute,
                         done: set[str]) -> Budget | None:
        """The downgrade budget whose used share (before this request) reached its ``downgrade_at``,
        when a cheaper tier exists."""
        for (budget, _slot), r in zip(pairs, got.ratios):
            if budget.action == "downgrade" and budget.downgrade_at < 1 and r >= budget.downgrade_at \
                    and budget.name not in done \
                    and not budget.soft and self._cheaper(served, route) is not None:
                return budget
        return None

    async def _give_back(self, ask: Ask) -> None:
        try:
            await self.guarded.release(ask.rid, tuple(s.key for s in ask.slots), ask.now + ask.ttl_s)
        except StoreUnavailable:
            self._orphan(ask)  # the background loop takes it back once the store answers

    def _switch(self, budget: Budget, served: ServedModel, route: ModelRoute, why: str) -> ModelRoute:
        cheaper = self._cheaper(served, route)
        assert cheaper is not None
        self._action("downgrade")
        log.info("budget %s (%s): downgrading %s from tier %s to %s", budget.name, why, served.name,
                 route.cfg.tier, cheaper.cfg.tier)
        return cheaper

    def _unreserved(self, attrs, served, route, req, ctx, pairs, ask: Ask) -> Grant:
        """on_store_error.budgets fail_open: admitted within the request budgets, nothing reserved."""
        self._action("fail_open")
        self._unlogged_open += 1
        now = self.clock.time()
        if now - self._open_logged_at >= FAIL_OPEN_LOG_EVERY_S:
            log.error("governance store unreachable: admitted %d request(s) without a budget reservation "
                      "(on_store_error.budgets: fail_open)", self._unlogged_open)
            self._unlogged_open, self._open_logged_at = 0, now
        # The member is never stored: settling it only adds usage, into the bucket of ask.now.
        got = Granted(True, completion=ask.max_completion, member=f"{ask.rid}@{ask.now!r}|0|0",
                      ratios=[0.0] * len(pairs), unreserved=True)
        return self._grant(ask.rid, attrs, served, route, req, ctx, pairs, got, None)

    def _orphan(self, ask: Ask) -> None:
        if len(self._orphans) < MAX_ORPHANS:
            self._orphans[ask.rid] = (tuple(s.key for s in ask.slots), ask.now + ask.ttl_s)

    async def _release(self, rid: str) -> int:
        found = self._orphans.get(rid)
        if found is None:
            return 0
        n = await self.guarded.release(rid, *found)
        self._orphans.pop(rid, None)
        return n

    async def release_orphans(self) -> int:
        """Take back the reservations of reserves that timed out but ran once the store answered
        again (a paused Redis reads what was already sent). The background loop calls this."""
        if not self._orphans or not self.guarded.up:
            return 0
        now, released = self.clock.time(), 0
        for rid, (_keys, expires_at) in list(self._orphans.items()):
            if expires_at <= now:  # expired on its own by now
                self._orphans.pop(rid, None)
                continue
            try:
                released += await self._release(rid)
            except StoreUnavailable:
                break  # down again: the next round retries
        if released:
            log.warning("took back %d reservation(s) made by reserves that had timed out", released)
        return released

    @staticmethod
    def _cheaper(served: ServedModel, route: ModelRoute) -> ModelRoute | None:
        i = next((i for i, t in enumerate(served.tiers) if t is route), 0)
        return served.tiers[i - 1] if i > 0 else None

    def _grant(self, rid, attrs, served, route, req, ctx, pairs, got: Granted, binding) -> Grant:
        each = got.completion // req.sequences  # vLLM reads max_tokens per sequence
        if each != req.max_tokens:
            req = req.with_max_tokens(each)
        return Grant(self, rid, attrs, served.name, route, req, ctx, pairs, got, binding)

    # ---- during the stream ----------------------------------------------------------

    def stream_check(self, grant: Grant) -> KvrouteError | None:
        """Why a running stream must stop now, or None (no I/O)."""
        hit = self.kill.check(grant.attrs.tenant, grant.attrs.agent, grant.model)
        if hit is not None:
            self._action("stream_cut")
            return AgentHalted(f"Halted by the kill switch ({hit[0]}) mid-stream: {hit[1]['reason']}",
                               param=hit[0])
        deadline = grant.reserved.deadline
        if deadline is not None and self.clock.time() >= deadline:
            self._action("stream_cut")
            name = next((b.name for b, s in grant.budgets if s.wall_s is not None and s.hard), "session")
            return BudgetExceeded(f"Stream stopped after {grant.generated} completion tokens: budget '{name}' "
                                  "ran out of wall-clock time.", param=name)
        if grant.generated > grant.reserved.completion:
            self._action("stream_cut")
            name = grant.binding.name if grant.binding else "request max_tokens"
            return BudgetExceeded(f"Stream stopped after {grant.generated} completion tokens: the "
                                  f"{grant.reserved.completion} tokens that budget '{name}' allowed are spent.",
                                  param=grant.binding.name if grant.binding else None)
        return None

    # ---- settlement ------------------------------------------------------------------

    def finish(self, grant: Grant | None, dispatch: Any) -> None:
        """Settle ``grant`` in the background. Never raises, never awaits; safe in ``finally``."""
        if grant is None or grant.settled:
            return
        grant.settled = True
        task = asyncio.get_running_loop().create_task(self._settle(grant, dispatch))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def drain(self) -> None:
        """Wait for every settlement in flight (tests, shutdown)."""
        while self.pending:
            await asyncio.gather(*list(self.pending), return_exceptions=True)
            # A finished task's own discard runs on a later loop turn, and on Python 3.12+
            # gathering finished tasks returns without one: without this, the loop spins.
            self.pending.difference_update([t for t in self.pending if t.done()])

    @staticmethod
    def usage_of(grant: Grant, dispatch: Any) -> tuple[int, int, int]:
        usage = getattr(dispatch, "usage", None)
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            details = usage.get("prompt_tokens_details") or {}
            cached = details.get("cached_tokens") if isinstance(details, dict) else 0
            completion = usage.get("completion_tokens")
            return (usage["prompt_tokens"], cached if isinstance(cached, int) else 0,
                    completion if isinstance(completion, int) else grant.generated)
        if (grant.generated or getattr(dispatch, "client_started", False)
                or getattr(dispatch, "status", None) == "client_disconnected"):
            # No usage came: the prompt as a floor (a client that hung up on a whole answer
            # stopped the worker part way, after its prefill had begun).
            return grant.prompt_tokens, 0, grant.generated
        return 0, 0, 0  # never reached a worker, or the worker refused it

    async def _settle(self, grant: Grant, dispatch: Any) -> None:
        prompt, cached, completion = self.usage_of(grant, dispatch)
        usd = Rates.of(grant.route.cfg.price).cost(prompt, cached, completion)
        tokens = prompt + completion
        keys = tuple(s.key for _, s in grant.budgets)
        try:
            if grant.reserved.unreserved:
                await self._release(grant.rid)  # its reserve may have run after all, once the store answered
            if keys:
                used = await self.guarded.settle(grant.reserved.member, keys, grant.reserved.tokens,
                                                 grant.reserved.usd, tokens, usd, grant.tool_calls,
                                                 now=self.clock.time(), slots=tuple(s for _, s in grant.budgets))
            else:
                used = []
            if tokens:
                await self.ledger.record(grant.attrs, grant.model, grant.route.cfg.tier, prompt, cached, completion,
                                         usd, self.clock.time(), self.alerts.spike_series(grant.attrs))
            for (budget, slot), u in zip(grant.budgets, used):
                await self.alerts.budget_used(slot, budget.scope, u, self._key_label(budget, grant.attrs))
            if usd > 0:
                await self.alerts.check_spike(grant.attrs)
        except StoreUnavailable:
            pass  # counted in kvroute_store_errors_total and logged once per outage by the guard
        except Exception as exc:
            log.error("settling request %s failed (its reservation expires in %.0f s): %s: %s", grant.rid,
                      self.cfg.reservation_ttl_s, type(exc).__name__, exc)
        self._record(grant, dispatch, prompt, cached, completion, usd)

    def _record(self, grant: Grant, dispatch: Any, prompt: int, cached: int, completion: int, usd: float) -> None:
        a = grant.attrs
        tv = self.cfg.tag_values
        labels = (a.tenant if a.tenant in self._tenants else "other", _label(a.agent, tv.get("agent")),
                  _label(a.feature, tv.get("feature")), grant.model)
        m = self.metrics
        m.spend_usd.labels(*labels).inc(usd)
        for kind, n in (("prompt", prompt), ("cached", cached), ("completion", completion)):
            if n:
                m.spend_tokens.labels(*labels, kind).inc(n)
        worker = getattr(getattr(dispatch, "worker", None), "url", None)
        if spend_log.isEnabledFor(logging.INFO):
            spend_log.info("%s", orjson.dumps({
                "request": grant.rid, "trace_id": a.trace_id, "tenant": a.tenant, "agent": a.agent, "task": a.task,
                "feature": a.feature, "user": a.user, "session": a.session,
                "session_source": a.session_source, "model": grant.model,
                "tier": grant.route.cfg.tier, "worker": worker, "status": getattr(dispatch, "status", "not_sent"),
                "prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": completion,
                "tool_calls": grant.tool_calls, "cost_usd": round(usd, 9),
                "cut": grant.cut.code if grant.cut else None}).decode())

    def _key_label(self, budget: Budget, attrs: Attribution) -> str:
        """The gauge's ``key`` label: the instance's tenant or tag value when the allow-list
        (``tag_values``, configured tenants) bounds it; ``other`` otherwise (sessions, users)."""
        if budget.scope in ("global", "request"):
            return "*"
        if budget.scope == "tenant":
            return attrs.tenant if attrs.tenant in self._tenants else "other"
        if budget.scope == "session":
            return "other"
        return _label(attrs.tag(budget.scope), self.cfg.tag_values.get(budget.scope))

    def _action(self, action: str) -> None:
        self.metrics.governance_actions.labels(action).inc()

    # ---- queries and lifecycle ----------------------------------------------------------

    async def spend(self, tenant: str | None, group_by: tuple[str, ...], window_s: int) -> list[dict]:
        return await self.ledger.query(tenant, group_by, window_s, self.clock.time())

    async def background(self, session: aiohttp.ClientSession) -> None:
        """Keep the kill switch fresh on an idle replica, and send webhook alerts."""
        tasks = []
        if self.alerts.receivers:
            tasks.append(asyncio.create_task(self.alerts.run_webhooks(session)))
        try:
            while True:
                try:
                    await self.kill.refresh(session)
                    await self.release_orphans()
                except Exception as exc:
                    log.error("kill switch refresh failed: %s: %s", type(exc).__name__, exc)
                await asyncio.sleep(self.cfg.kill_switch.ttl_s)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.drain(), 10)
        await self.guarded.close()

