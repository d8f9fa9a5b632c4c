"""The spend ledger: per-hour totals by tenant and tags, for the spend API and spike alerts.

Each request adds its tokens and cost to the current hour's bucket under its tag
combination (tenant, agent, task, feature, user, model, tier), so a query over a window
of W hours reads W buckets whatever the traffic, and grouping happens at query time.
Buckets are kept for ``retention_s`` (8 days). Tag values are stored as sent (already
truncated); only Prometheus labels go through the allow-list.

Session and trace ID make a combination per conversation or per user request, so they go
into finer hourly buckets kept for two days (``group_by=session`` or ``trace_id``), and
each trace has its own small hash: what one user request cost across every agent and
model that took part in it.
"""

from __future__ import annotations

import math
from collections import defaultdict

from kvroute.router.governance.identity import Attribution
from kvroute.router.governance.store import Store

DIMENSIONS = ("tenant", "agent", "task", "feature", "user", "model", "tier")
METRICS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_usd")
RETENTION_S = 8 * 86400
DETAIL_DIMENSIONS = ("session", "trace_id")  # high-cardinality: kept for DETAIL_RETENTION_S only
DETAIL_RETENTION_S = 2 * 86400
_SEP, _MSEP = "\x1f", "\x1e"


def parse_window(value: str | None) -> int:
    """``hour``, ``day``, ``week``, ``<n>h``, ``<n>d`` or seconds; default a day."""
    if not value:
        return 86400
    named = {"hour": 3600, "day": 86400, "week": 7 * 86400}
    if value in named:
        return named[value]
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if value[-1] in units:
            seconds = float(value[:-1]) * units[value[-1]]
        else:
            seconds = float(value)
    except ValueError:
        raise ValueError(f"unknown window {value!r}: use hour, day, week, 6h, 2d or seconds") from None
    if not 0 < seconds <= RETENTION_S:
        raise ValueError(f"window must be between 1 second and {RETENTION_S // 86400} days")
    return int(seconds)


class Ledger:
    def __init__(self, store: Store):
        self.store = store

    async def record(self, attrs: Attribution, model: str, tier: str | None, prompt: int, cached: int,
                     completion: int, usd: float, now: float, series: tuple[str, ...] = ()) -> None:
        """``series``: the hourly spend series (spike detection) this request adds ``usd`` to."""
        combo = _SEP.join([attrs.tenant, attrs.agent or "", attrs.task or "", attrs.feature or "",
                           attrs.user or "", model, tier or ""])
        values = (1, prompt, cached, completion, usd)
        fields = {f"{combo}{_MSEP}{m}": float(v) for m, v in zip(METRICS, values) if v}
        await self.store.record_spend(int(now // 3600), fields, series or (attrs.tenant,), usd, RETENTION_S)
        # By session and trace: a finer hourly bucket kept for DETAIL_RETENTION_S, and one
        # hash per trace (its cost across agents and models, GET /v1/kvroute/spend/traces/ID).
        detail = _SEP.join([combo, attrs.session or "", attrs.trace_id or ""])
        await self.store.add_fields(f"detail:{int(now // 3600)}",
                                    {f"{detail}{_MSEP}{m}": float(v) for m, v in zip(METRICS, values) if v},
                                    DETAIL_RETENTION_S, now)
        if attrs.trace_id:
            per_trace = _SEP.join([attrs.tenant, attrs.agent or "", model, tier or ""])
            await self.store.add_fields(f"trace:{attrs.trace_id}",
                                        {f"{per_trace}{_MSEP}{m}": float(v) for m, v in zip(METRICS, values) if v},
                                        DETAIL_RETENTION_S, now)

    async def query(self, tenant: str | None, group_by: tuple[str, ...], window_s: int, now: float) -> list[dict]:
        hour = int(now // 3600)
        hours = range(hour - math.ceil(window_s / 3600) + 1, hour + 1)
        dims: tuple[str, ...] = DIMENSIONS
        if set(group_by) & set(DETAIL_DIMENSIONS):  # by session or trace: the finer, shorter-lived buckets
            if window_s > DETAIL_RETENTION_S:
                raise ValueError(f"group_by session or trace_id covers at most the last "
                                 f"{DETAIL_RETENTION_S // 3600} hours; ask for a shorter window")
            raw: dict[str, float] = defaultdict(float)
            for bucket in await self.store.read_fields([f"detail:{h}" for h in hours], now):
                for f, v in bucket.items():
                    raw[f] += v
            dims = DIMENSIONS + DETAIL_DIMENSIONS
        else:
            raw = await self.store.spend(hours)
        groups: dict[tuple, dict[str, float]] = defaultdict(lambda: dict.fromkeys(METRICS, 0.0))
        for f, v in raw.items():
            combo, _, metric = f.rpartition(_MSEP)
            tags = dict(zip(dims, combo.split(_SEP)))
            if tenant is not None and tags.get("tenant") != tenant:
                continue
            groups[tuple(tags.get(d) or None for d in group_by)][metric] += v
        rows = []
        for key, totals in groups.items():
            row: dict = dict(zip(group_by, key))
            row.update({m: (round(totals[m], 9) if m == "cost_usd" else int(totals[m])) for m in METRICS})
            rows.append(row)
        rows.sort(key=lambda r: -r["cost_usd"])
        return rows

    async def trace(self, trace_id: str, tenant: str | None, now: float) -> dict | None:
        """One trace's calls, tokens and cost across agents and models; only ``tenant``'s part
        unless None (an admin). None when nothing of it is visible (unknown, expired, or another
        tenant's)."""
        (raw,) = await self.store.read_fields([f"trace:{trace_id}"], now)
        by: dict[tuple, dict[str, float]] = defaultdict(lambda: dict.fromkeys(METRICS, 0.0))
        for f, v in raw.items():
            combo, _, metric = f.rpartition(_MSEP)
            t, agent, model, tier = (combo.split(_SEP) + ["", "", "", ""])[:4]
            if tenant is None or t == tenant:
                by[(t, agent or None, model, tier or None)][metric] += v
        if not by:
            return None
        total = dict.fromkeys(METRICS, 0.0)
        rows = []
        for (t, agent, model, tier), sums in sorted(by.items(), key=lambda kv: -kv[1]["cost_usd"]):
            rows.append({"tenant": t, "agent": agent, "model": model, "tier": tier, **_rounded(sums)})
            for m in METRICS:
                total[m] += sums[m]
        return {"object": "trace_spend", "trace_id": trace_id, **_rounded(total), "by": rows}


def _rounded(sums: dict[str, float]) -> dict:
    return {m: (round(sums[m], 9) if m == "cost_usd" else int(sums[m])) for m in METRICS}
