"""HTTP routes of governance: the spend API and the admin API (kill switch, alerts).

``GET /v1/kvroute/spend?group_by=agent,feature&window=day[&tenant=NAME]``: an admin key
sees every tenant (or the one it names); a tenant key sees only its own tenant, and
naming another is 403. Without any key configured (an open router) it is open.
``POST /v1/kvroute/admin/kill`` ``{"scope": "global|tenant|agent|model", "value", "reason"}``
halts, ``DELETE`` (same body, or query) resumes, ``GET`` lists; admin key only. The list
says whether the store's entries are current (``"store": "ok"``), the last ones read while
it is unreachable (``stale``), or never read since start (``unknown``). While the store is
down, halting or resuming through the API is 503: the entry could not be shared.
"""

from __future__ import annotations

import re

import orjson
from aiohttp import web

from kvroute.router.errors import (
    Forbidden,
    GovernanceUnavailable,
    InvalidRequest,
    NotFound,
    StoreUnavailable,
    Unauthorized,
)
from kvroute.router.governance.governor import Governor
from kvroute.router.governance.killswitch import entry_key
from kvroute.router.governance.ledger import DETAIL_DIMENSIONS, DETAIL_RETENTION_S, DIMENSIONS, parse_window

_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_STORE_DOWN = ("The kill switch's store (Redis) did not answer, so the change may not have been made or "
               "shared; while it is down, use kill_switch.file or kill_switch.url.")


def _governor(request: web.Request, key: web.AppKey) -> Governor:
    governor = request.app.get(key)
    if governor is None:
        raise NotFound("Cost governance is not configured on this router (config key 'governance').")
    return governor


def _spend_tenant(request: web.Request, gov: Governor) -> str | None:
    """The tenant whose spend the caller may see: its own, or (an admin, an open router) the
    one it names, None for all."""
    caller = gov.auth.caller(request.headers.get("Authorization"))
    asked = request.query.get("tenant") or None
    if caller is None:
        if not gov.auth.open or gov.cfg.admin_keys:
            raise Unauthorized("The spend API needs an API key (Authorization: Bearer <key>).")
        return asked
    if caller.admin:
        return asked
    if asked is not None and asked != caller.tenant:
        raise Forbidden("A tenant key may only see its own tenant's spend.", param="tenant")
    return caller.tenant


def spend_handler(key: web.AppKey):
    async def spend(request: web.Request) -> web.Response:
        gov = _governor(request, key)
        tenant = _spend_tenant(request, gov)
        group_by = tuple(g for g in (request.query.get("group_by") or "").split(",") if g)
        valid = DIMENSIONS + DETAIL_DIMENSIONS
        for g in group_by:
            if g not in valid:
                raise InvalidRequest(f"Unknown group_by '{g}'; valid: {', '.join(valid)}", param="group_by")
        try:
            window_s = parse_window(request.query.get("window"))
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="window") from None
        try:
            rows = await gov.spend(tenant, group_by, window_s)
        except ValueError as exc:  # a window longer than the session and trace buckets are kept
            raise InvalidRequest(str(exc), param="window") from None
        return web.json_response({"object": "list", "tenant": tenant, "group_by": list(group_by),
                                  "window_s": window_s, "data": rows})

    return spend


def trace_spend_handler(key: web.AppKey):
    """``GET /v1/kvroute/spend/traces/{trace_id}``: one trace's cost across agents and models.
    A tenant key sees its own tenant's part; a trace it has no part in is 404, as is an
    unknown one. An admin key sees every tenant's."""

    async def trace_spend(request: web.Request) -> web.Response:
        gov = _governor(request, key)
        tenant = _spend_tenant(request, gov)
        trace_id = request.match_info["trace_id"].lower()
        if not _TRACE_ID.fullmatch(trace_id):
            raise InvalidRequest("A trace ID is 32 hex digits, as in traceparent.", param="trace_id")
        found = await gov.ledger.trace(trace_id, tenant, gov.clock.time())
        if found is None:
            raise NotFound(f"No spend recorded for trace {trace_id} in the last "
                           f"{DETAIL_RETENTION_S // 3600} hours.")
        return web.json_response(found)

    return trace_spend


async def _kill_args(request: web.Request) -> tuple[str, str | None, str]:
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise InvalidRequest("Request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    scope = body.get("scope", request.query.get("scope", "global"))
    value = body.get("value", request.query.get("value"))
    reason = body.get("reason") or "halted by an operator"
    if not isinstance(scope, str) or (value is not None and not isinstance(value, str)) \
            or not isinstance(reason, str):
        raise InvalidRequest("'scope', 'value' and 'reason' must be strings")
    try:
        entry_key(scope, value)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="scope") from None
    return scope, value, reason


def admin_handlers(key: web.AppKey) -> dict:
    def admin(request: web.Request) -> Governor:
        gov = _governor(request, key)
        gov.auth.require_admin(request.headers.get("Authorization"))
        return gov

    def listing(gov: Governor) -> web.Response:
        return web.json_response({"object": "list", "data": gov.kill.entries(), "store": gov.kill.store_state})

    async def kill(request: web.Request) -> web.Response:
        gov = admin(request)
        scope, value, reason = await _kill_args(request)
        try:
            await gov.kill.set(scope, value, reason)
        except StoreUnavailable:
            raise GovernanceUnavailable(_STORE_DOWN) from None
        return listing(gov)

    async def resume(request: web.Request) -> web.Response:
        gov = admin(request)
        scope, value, _ = await _kill_args(request)
        try:
            found = await gov.kill.clear(scope, value)
        except StoreUnavailable:
            raise GovernanceUnavailable(_STORE_DOWN) from None
        if not found:
            raise NotFound(f"No kill switch set through the admin API for {entry_key(scope, value)}")
        return listing(gov)

    async def list_kills(request: web.Request) -> web.Response:
        gov = admin(request)
        await gov.kill.refresh()
        return listing(gov)

    async def alerts(request: web.Request) -> web.Response:
        gov = admin(request)
        return web.json_response({"object": "list", "data": gov.alerts.fired})

    return {"kill": kill, "resume": resume, "list_kills": list_kills, "alerts": alerts}


def add_governance_routes(app: web.Application, key: web.AppKey) -> None:
    h = admin_handlers(key)
    app.router.add_get("/v1/kvroute/spend", spend_handler(key))
    app.router.add_get("/v1/kvroute/spend/traces/{trace_id}", trace_spend_handler(key))
    app.router.add_post("/v1/kvroute/admin/kill", h["kill"])
    app.router.add_delete("/v1/kvroute/admin/kill", h["resume"])
    app.router.add_get("/v1/kvroute/admin/kill", h["list_kills"])
    app.router.add_get("/v1/kvroute/admin/alerts", h["alerts"])
