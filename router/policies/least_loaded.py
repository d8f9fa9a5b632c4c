"""least_loaded: the worker with the fewest in-flight tokens.

Load is the router's own in-flight accounting (uncached prefill plus expected decode
tokens of requests it has sent and not seen finish). Ties, e.g. an idle fleet, are broken
at random. Cost O(workers). No knobs.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvroute.router.policies.base import Policy, RequestContext, pick_random_min
from kvroute.router.upstream.workers import Worker


class LeastLoadedPolicy(Policy):
    name = "least_loaded"

    def select(self, workers: Sequence[Worker], ctx: RequestContext) -> Worker | None:
        if not workers:
            return None
        scores = [float(w.in_flight_tokens) for w in workers]
        return pick_random_min(workers, scores, self.deps.rng)
