"""The spend ledger: per-hour totals by tenant and tags, for the spend API and spike alerts.

Each request adds its tokens and cost to the current hour's bucket under its tag
combination (tenant, agent, task, feature, user, model, tier), so a query over a window
of W hours reads W buckets whatever the traffic, and grouping happens at query time.
Buckets are kept for ``retention_s`` (8 days). Tag values are stored as sent (already
truncated); only Prometheus labels go through the allow-list.
"""

from __future__ import annotations

import math
from collections import defaultdict

from kvroute.router.governance.identity import Attribution
from kvroute.router.governance.store import Store

DIMENSIONS = ("tenant", "agent", "task", "feature", "user", "model", "tier")
METRICS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_usd")
RETENTION_S = 8 * 86400
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
                     completion: int, usd: float, now: float) -> None:
        combo = _SEP.join([attrs.tenant, attrs.agent or "", attrs.task or "", attrs.feature or "",
                           attrs.user or "", model, tier or ""])
        values = (1, prompt, cached, completion, usd)
        fields = {f"{combo}{_MSEP}{m}": float(v) for m, v in zip(METRICS, values) if v}
        await self.store.record_spend(int(now // 3600), fields, attrs.tenant, usd, RETENTION_S)

    async def query(self, tenant: str | None, group_by: tuple[str, ...], window_s: int, now: float) -> list[dict]:
        hour = int(now // 3600)
        hours = range(hour - math.ceil(window_s / 3600) + 1, hour + 1)
        raw = await self.store.spend(hours)
        groups: dict[tuple, dict[str, float]] = defaultdict(lambda: dict.fromkeys(METRICS, 0.0))
        for f, v in raw.items():
            combo, _, metric = f.rpartition(_MSEP)
            tags = dict(zip(DIMENSIONS, combo.split(_SEP)))
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
