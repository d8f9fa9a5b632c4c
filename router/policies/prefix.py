"""prefix (default): send a request where its prompt's KV prefix is cached, balanced by load.

Algorithm, per request:
1. Eligible workers: those whose queue (router in-flight, or vLLM running + waiting when
   other replicas add more) is under ``ceil(balance_factor * (total + 1) / n) +
   balance_slack``, and whose KV cache is not saturated by running requests
   (``vllm:kv_cache_usage_perc`` below ``kv_saturation``). This is what spreads a hot
   prefix: once its holder is over the bound, the next best worker gets the request and,
   with it, a second copy of the prefix.
2. Match the request's block keys against the prefix index: the longest cached prefix
   per worker, in blocks.
3. If no eligible worker holds even the first block (a miss), fall back to bounded-load
   consistent hashing on the first block, so that router replicas with the same config
   place new prefixes alike. The bound here is on cache occupancy as well as queue: a
   worker already holding more than ``cache_balance_factor`` x the mean number of
   indexed blocks is skipped, so new prefixes spread evenly over the fleet's caches
   instead of piling onto whichever worker the ring favours, and so is a worker whose
   cache is near full (where a new prefix would evict hot ones).
4. Otherwise score each eligible worker by the tokens it would have to compute and the
   work already queued on it, and take the lowest (ties at random):
       score = (prompt_tokens - cached_tokens) + load_weight * load_tokens
       load_tokens = in-flight tokens + external_requests * external_request_tokens

Cost: O(blocks matched + workers) per request. Knobs (``policy_options``):
``load_weight`` (0.25), ``balance_factor`` (1.25), ``balance_slack`` (2),
``external_request_tokens`` (512), ``cache_balance_factor`` (1.1), ``kv_saturation``
(0.95) and the ring's ``vnodes`` (64).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from router.errors import ConfigError
from router.fleet.workers import Worker
from router.policies.base import Policy, RequestContext, pick_random_min
from router.policies.consistent_hash import HashRing, route_key

_DEFAULTS = {
    # Cache reuse saves work for everyone while a queue is transient: weigh load lower than
    # prefill. 1.0 copied groups to idle workers and thrashed caches (benchmarks: 0.62 vs
    # 0.85 hit rate on 4 real workers).
    "load_weight": 0.25,
    "balance_factor": 1.25,
    "balance_slack": 2,
    "external_request_tokens": 512,
    "vnodes": 64,
    "cache_balance_factor": 1.1,
    "kv_saturation": 0.95,
}


class PrefixPolicy(Policy):
    name = "prefix"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        opts = {**_DEFAULTS, **self.options}
        self.load_weight = float(opts["load_weight"])
        self.balance_factor = float(opts["balance_factor"])
        self.balance_slack = int(opts["balance_slack"])
        self.external_request_tokens = int(opts["external_request_tokens"])
        self.ring = HashRing(int(opts["vnodes"]))
        self.cache_balance_factor = float(opts["cache_balance_factor"])
        self.kv_saturation = float(opts["kv_saturation"])

    @classmethod
    def validate_options(cls, options: Mapping[str, Any], key: str) -> None:
        for k, v in options.items():
            if k not in _DEFAULTS:
                raise ConfigError(f"{key}.{k}", f"unknown option; valid: {', '.join(_DEFAULTS)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"{key}.{k}", f"expected a non-negative number, got {v!r}")
        for name in ("balance_factor", "cache_balance_factor"):
            if options.get(name, 1.25) < 1:
                raise ConfigError(f"{key}.{name}", "must be at least 1")

    def eligible(self, workers: Sequence[Worker]) -> list[Worker]:
        total = sum(w.queue_depth for w in workers)
        bound = math.ceil(self.balance_factor * (total + 1) / len(workers)) + self.balance_slack
        ok = [w for w in workers if w.queue_depth < bound and w.kv_usage < self.kv_saturation]
        return ok or [w for w in workers if w.queue_depth < bound] or list(workers)

    def load_tokens(self, w: Worker) -> float:
        external = max(0, w.vllm_running + w.vllm_waiting - w.in_flight_requests)
        return w.in_flight_tokens + external * self.external_request_tokens

    def place_new_prefix(self, key: int, candidates: list[Worker]) -> Worker:
        """Ring order from ``key``; skip workers whose cache holds well above the mean."""
        index = self.deps.index
        occupancy = {w.url: index.blocks_of(w.url) for w in candidates}
        bound = self.cache_balance_factor * sum(occupancy.values()) / len(candidates)
        roomy = [w for w in candidates if occupancy[w.url] <= bound and w.kv_usage < self.kv_saturation - 0.05]
        return self.ring.pick(key, roomy or candidates, self.balance_factor)

    def on_workers_changed(self, workers: Sequence[Worker]) -> None:
        super().on_workers_changed(workers)
        self.ring.forget(w.url for w in workers)

    def select(self, workers: Sequence[Worker], ctx: RequestContext) -> Worker | None:
        if not workers:
            return None
        candidates = self.eligible(workers)
        matched = self.deps.index.match(ctx.block_keys, [w.url for w in candidates])
        if not any(matched.values()):
            key = route_key(ctx)
            if key is not None:
                return self.place_new_prefix(key, candidates)
        scores = [
            max(0, ctx.prompt_tokens - matched[w.url] * ctx.block_size)
            + self.load_weight * self.load_tokens(w)
            for w in candidates
        ]
        return pick_random_min(candidates, scores, self.deps.rng)
