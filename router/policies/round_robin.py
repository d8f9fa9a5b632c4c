"""round_robin: each request goes to the next healthy worker in turn.

Cost O(1) while the healthy set is unchanged (its URL order is sorted once per set). No
knobs. It ignores prefixes and load; it is the baseline that benchmarks compare against.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvroute.router.policies.base import PerCandidates, Policy, RequestContext
from kvroute.router.upstream.workers import Worker


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._next = 0
        # sorted by URL: stable under membership churn
        self._ordered = PerCandidates(lambda workers: sorted(workers, key=lambda w: w.url))

    def select(self, workers: Sequence[Worker], ctx: RequestContext) -> Worker | None:
        if not workers:
            return None
        ordered = self._ordered.of(workers)
        worker = ordered[self._next % len(ordered)]
        self._next += 1
        return worker
