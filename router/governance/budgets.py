"""Which budget instances a request falls under, what it costs, and how a refusal reads.

A budget's scope picks the counter: one per session, per agent (within a tenant), per
task, feature or user, per tenant, or one for everything (``global``). Windowed budgets
are rolling: they count the usage of the last ``window_s`` seconds (``window: day`` is the
last 24 hours, not the calendar day), kept in ``buckets`` sub-buckets (24 by default), so
usage leaves the window one sub-bucket at a time and is remembered for between
``window_s`` and ``window_s + window_s / buckets`` seconds. A refusal names when the
oldest usage ages out. A session budget lives as long as the session
(``session_ttl_s`` after its last request). ``request`` budgets need no state: they cap
one request's prompt and completion.

Named limits: a budget with ``match`` (or ``tenant``) applies only to requests whose tags
have the given values, e.g. ``{scope: agent, match: {agent: research}, limit: {usd: 2}}``.
Every budget that applies is enforced, so the tightest wins; a budget that names others
in ``overrides`` replaces them for the requests it applies to (a tenant's own session
limits instead of the defaults).

A session the router derived (no ``x-kvroute-session`` or ``user``; ``identity.py``) has no
wall-clock limit, since unrelated conversations may share it over time, and its state is
dropped ``session_id.ttl_s`` after its last request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from kvroute.router.governance.config import Budget
from kvroute.router.governance.identity import Attribution
from kvroute.router.governance.store import Slot

if TYPE_CHECKING:  # router.config imports governance (and telemetry, which imports this module)
    from kvroute.router.config import Price


@dataclass(frozen=True)
class Rates:
    """Dollars per token."""

    input: float
    cached: float
    output: float

    @classmethod
    def of(cls, price: Price) -> Rates:
        cached = price.input_per_m if price.cached_input_per_m is None else price.cached_input_per_m
        return cls(price.input_per_m / 1e6, cached / 1e6, price.output_per_m / 1e6)

    def cost(self, prompt: int, cached: int, completion: int) -> float:
        cached = min(max(cached, 0), prompt)
        return (prompt - cached) * self.input + cached * self.cached + completion * self.output


def tags_of(attrs: Attribution) -> dict[str, str | None]:
    return {"tenant": attrs.tenant, "agent": attrs.agent, "task": attrs.task, "feature": attrs.feature,
            "user": attrs.user}


def applicable(budgets: tuple[Budget, ...], attrs: Attribution) -> list[Budget]:
    """The budgets whose tenant and ``match`` fit the request, less those another one overrides."""
    tags = tags_of(attrs)
    hits = [b for b in budgets if b.matches(tags)]
    dropped = {name for b in hits for name in b.overrides}
    return [b for b in hits if b.name not in dropped] if dropped else hits


def scope_value(budget: Budget, attrs: Attribution) -> str | None:
    """The counter's identity within the budget, or None when the budget has none for this request."""
    if budget.scope in ("global", "request"):
        return "*"
    if budget.scope == "tenant":
        return attrs.tenant
    value = attrs.session if budget.scope == "session" else attrs.tag(budget.scope)
    return f"{attrs.tenant}/{value}" if value else None


def slots_for(budgets: list[Budget], attrs: Attribution, now: float,
              session_ttl_s: float, derived_ttl_s: float | None = None) -> list[tuple[Budget, Slot]]:
    """The budget instances of the (applicable) ``budgets``; a derived session lives ``derived_ttl_s``."""
    out = []
    derived = attrs.derived_session
    for b in budgets:
        if b.scope == "request":
            continue
        value = scope_value(b, attrs)
        if value is None:
            continue
        lim = b.limits
        if derived and b.scope == "session":
            slot = Slot(f"{b.name}:{value}", b.name, lim.tokens, lim.usd, lim.tool_calls, None, not b.soft,
                        now + (derived_ttl_s or session_ttl_s))
        elif b.window_s:
            bucket_s = b.window_s / b.buckets
            slot = Slot(f"{b.name}:{value}:{b.window_s}/{b.buckets}", b.name, lim.tokens, lim.usd, lim.tool_calls,
                        lim.wall_s, not b.soft, now + b.window_s + bucket_s, bucket_s, b.buckets)
        else:
            slot = Slot(f"{b.name}:{value}", b.name, lim.tokens, lim.usd, lim.tool_calls, lim.wall_s, not b.soft,
                        now + session_ttl_s)
        out.append((b, slot))
    return out


def request_cap(budgets: list[Budget], attrs: Attribution, prompt: int,
                rates: Rates) -> tuple[float, Budget | None]:
    """Completion tokens the hard ``request`` budgets leave, and the one that binds."""
    cap, binding = math.inf, None
    for b in budgets:
        if b.scope != "request" or b.soft or scope_value(b, attrs) is None:
            continue
        if b.limits.tokens is not None and b.limits.tokens - prompt < cap:
            cap, binding = b.limits.tokens - prompt, b
        if b.limits.usd is not None and (rates.input > 0 or rates.output > 0):
            left = b.limits.usd - prompt * rates.input
            room = math.floor(left / rates.output + 1e-9) if rates.output > 0 else (math.inf if left >= 0 else -1)
            if room < cap:
                cap, binding = room, b
    return cap, binding


def reset_at(budget: Budget, now: float) -> float | None:
    """The latest a rolling budget's current usage can be remembered (when the store says nothing sooner)."""
    if budget.window_s:
        bucket_s = budget.window_s / budget.buckets
        return (math.floor(now / bucket_s) + budget.buckets + 1) * bucket_s
    return None


def _span(window_s: int) -> str:
    for name, s in (("week", 7 * 86400), ("day", 86400), ("hour", 3600)):
        if window_s == s:
            return "24 hours" if name == "day" else f"1 {name}"
    return f"{window_s} seconds"


_REASONS = {"tokens": "its token limit", "usd": "its dollar limit", "tool_calls": "its tool-call limit",
            "wall_s": "its wall-clock limit"}


def refusal(budget: Budget, reason: str | None, now: float,
            frees_at: float | None = None) -> tuple[str, float | None]:
    """The 429 message for a refused request, and seconds until the budget frees room.

    ``frees_at`` is when the store says the rolling budget's oldest usage ages out."""
    what = _REASONS.get(reason or "", "its limit")
    lim = budget.limits
    limits = ", ".join(f"{k}={v:g}" for k, v in (("tokens", lim.tokens), ("usd", lim.usd),
                                                   ("tool_calls", lim.tool_calls), ("wall_s", lim.wall_s))
                       if v is not None)
    msg = f"Budget '{budget.name}' ({budget.scope} scope; {limits}) has no room left: this request would exceed {what}."
    at = frees_at if frees_at is not None and budget.window_s else reset_at(budget, now)
    if at is not None:
        at = max(at, now)
        stamp = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return (f"{msg} It counts the last {_span(budget.window_s or 0)}; room frees up at {stamp}, as its oldest "
                "usage ages out.", at - now)
    if budget.scope == "session":
        return f"{msg} Session budgets do not reset: start a new session.", None
    if budget.scope == "request":
        return f"{msg} Lower max_tokens or shorten the prompt.", None
    return f"{msg} It does not reset on its own.", None
