"""What one router produced in one benchmark run, and the summary figures derived from it.

Simulated and real fleets both fill a ``RouterRun``; ``summarize`` turns it into the
entry ``results.json`` holds under ``routers``. Hit rate is always vLLM's definition:
prefix-cache hit tokens over prefix-cache query tokens, summed over workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RouterRun:
    router: str  # e.g. "prefix", "round_robin", "smg:cache_aware", "oracle"
    queries: float = 0.0  # prefix-cache query tokens (vLLM counter delta, all workers)
    hits: float = 0.0  # prefix-cache hit tokens
    per_worker_requests: list[float] = field(default_factory=list)
    per_worker_hit_rate: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)  # one per successful request
    latency_s: list[float] = field(default_factory=list)
    completed: int = 0
    errors: int = 0
    duration_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def max_share_over_fair(per_worker: Sequence[float]) -> float | None:
    """The busiest worker's share of requests divided by the fair share 1/n."""
    total = sum(per_worker)
    if not per_worker or total <= 0:
        return None
    return max(per_worker) / total * len(per_worker)


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def _router_added(state: dict | list | None) -> float | None:
    """kvroute's own time per request, p50 in ms, from its metrics (the mean over replicas)."""
    states = state if isinstance(state, list) else [state]
    values = [s["added_ms_p50"] for s in states if isinstance(s, dict) and s.get("added_ms_p50") is not None]
    return round(sum(values) / len(values), 3) if values else None


def summarize(
    run: RouterRun, oracle_hit_rate: float | None, context: dict[str, Any]
) -> dict[str, Any]:
    """The ``results.json`` entry for one router; ``context`` adds workload, fleet, seed."""
    vs_oracle = run.hit_rate / oracle_hit_rate if oracle_hit_rate else None
    return {
        "router": run.router,
        "hit_rate": _round(run.hit_rate),
        "hit_rate_vs_oracle": _round(vs_oracle),
        "max_share_over_fair": _round(max_share_over_fair(run.per_worker_requests), 3),
        "ttft_p50_s": _round(percentile(run.ttft_s, 50), 5),
        "ttft_p99_s": _round(percentile(run.ttft_s, 99), 5),
        "latency_p50_s": _round(percentile(run.latency_s, 50), 5),
        "router_added_ms_p50": _router_added(run.extra.get("router_state")),
        "throughput_rps": _round(run.completed / run.duration_s if run.duration_s else None, 3),
        "completed": run.completed,
        "errors": run.errors,
        "duration_s": _round(run.duration_s, 3),
        "prefix_queries_tokens": run.queries,
        "prefix_hits_tokens": run.hits,
        "per_worker_requests": list(run.per_worker_requests),
        "per_worker_hit_rate": [_round(x) for x in run.per_worker_hit_rate],
        **run.extra,
        **context,
    }
