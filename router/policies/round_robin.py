"""round_robin: each request goes to the next healthy worker in turn.

Cost O(1). No knobs. It ignores prefixes and load; it is the baseline that benchmarks
compare against.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.fleet.workers import Worker
from router.policies.base import Policy, RequestContext


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._next = 0

    def select(self, workers: Sequence[Worker], ctx: RequestContext) -> Worker | None:
        if not workers:
            return None
        ordered = sorted(workers, key=lambda w: w.url)  # stable under membership churn
        worker = ordered[self._next % len(ordered)]
        self._next += 1
        return worker
