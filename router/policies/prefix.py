"""prefix (default): send a request where its prompt's KV prefix is cached, balanced by load.

Algorithm, per request:
1. Eligible workers: those whose queue (router in-flight, or vLLM running + waiting when
   other replicas add more) is under ``ceil(balance_factor * (total + 1) / n) +
   balance_slack`` (in fleets above ``sample`` workers the total is estimated from a
   random sample), and whose KV cache is not saturated by running requests
   (``vllm:kv_cache_usage_perc`` below ``kv_saturation``). A saturated worker that holds
   a quarter of the prompt or more stays eligible for it (a chat's or an agent's history:
   moving it recomputes that part and evicts another's), unless the prefix is hot (3.),
   which is then copied to an unsaturated worker instead.
2. Match the request's block keys against the prefix index: the longest cached prefix
   on each eligible worker that holds at least its first block.
3. Hot prefixes are copied to more workers, by their share of traffic and by the load
   they put on their holders (``router.policies.hot``). The router counts the route keys
   (first blocks) of its last ``hot_window`` requests; a prefix with share s of them is
   hot once s * n >= 1.5 and is then served by ``ceil(s * n * hot_replicas)`` workers.
   Below that share, a prefix is copied when even its least-loaded holder served more
   than ``hot_load`` fair shares of the last ``occupancy_window`` requests and most of
   them were this prefix's (it is the cause, not one of many), and the request carries
   no more than the part the prefix's requests share while those requests are mostly
   that part (a system prompt and a question, not chats' or agents' histories). For a
   hot prefix, while no holder has more than one block more of the prompt than the others
   (as a holder of a chat's or an agent's history behind a shared system prompt would),
   the request goes
   to the holder that served the fewest recent requests (of the last
   ``occupancy_window`` for a prefix copied for load), or, when a copy is due, to the
   eligible worker that served the fewest (which makes a new copy). One hot system
   prompt thus spreads evenly over a few workers instead of piling onto one or being
   copied everywhere, whatever its share.
4. If no eligible worker holds even the first block (a miss), fall back to bounded-load
   consistent hashing on the first block, so that router replicas with the same config
   place new prefixes alike. The bound here is on the cache's working set as well as on
   the queue. A worker's working set is the distinct prefixes of the last
   ``occupancy_window`` requests it served, less the one being placed; a worker with more
   of them than ``prefix_balance_factor`` x the fleet's mean, or more of their blocks than
   ``cache_balance_factor`` x the mean, is skipped, so new prefixes (a new chat, a new
   document) spread evenly over the fleet's caches instead of piling onto whichever worker
   the ring favours. So is a worker whose cache is near full of running requests (where a
   new prefix would evict hot ones). Recent traffic, not the blocks a worker holds,
   because a warm vLLM cache is always full: of blocks from an hour ago as much as of the
   prefixes in use. Prefixes are counted as well as blocks because a prefix's blocks are
   counted at its latest length: a worker of young chats looks small now, yet they grow.
5. Otherwise score the eligible holders, and the eligible workers of the sample (every
   worker in fleets up to ``sample``), by the tokens each would have to compute and the
   work already queued on it, and take the lowest (ties at random):
       score = (prompt_tokens - cached_tokens) + load_weight * load_tokens
       load_tokens = in-flight tokens + external_requests * external_request_tokens

Cost: O(blocks matched x holders + sample) per request, plus a short ring walk on a miss
and O(log blocks) per dispatch for the hot-prefix counts.
The candidate workers' map by URL is rebuilt only when the router's healthy set changes.
Knobs (``policy_options``): ``load_weight`` (0.1), ``balance_factor`` (2),
``balance_slack`` (4), ``external_request_tokens`` (512), ``prefix_balance_factor`` (1.0),
``cache_balance_factor`` (1.5), ``occupancy_window`` (256), ``kv_saturation`` (0.95),
``sample`` (16), ``hot_window`` (64), ``hot_replicas`` (1.5), ``hot_load`` (1.2; 0 turns
the load rule off) and the ring's ``vnodes`` (64).
Fallback: with no workers, None; a prompt under one block (no route key) is scored (5.);
when no worker is eligible, the whole sample is scored.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import Any

from kvroute.router.errors import ConfigError
from kvroute.router.policies.base import PerCandidates, Policy, PolicyDeps, RequestContext, pick_random_min
from kvroute.router.policies.consistent_hash import HashRing, route_key
from kvroute.router.policies.hot import HotPrefixes
from kvroute.router.upstream.workers import Worker

_DEFAULTS = {
    # Cache reuse saves work for everyone while a queue is transient, so load weighs
    # little and the queue bound is loose: on 4 real workers 0.1 / 2 / 4 matched the
    # oracle's hit rate on shared-prefix (0.884) and multi-turn (0.757), where 0.25 /
    # 1.25 / 2 moved chat sessions and groups off their caches (0.834 and 0.717).
    "load_weight": 0.1,
    "balance_factor": 2.0,
    "balance_slack": 4,
    "external_request_tokens": 512,
    "vnodes": 64,
    # A new prefix goes to a worker with at most the mean number of recent prefixes and at
    # most 1.5x the mean of their blocks. In the simulator (4 workers, tight caches, 10
    # seeds) this beat blocks <= 1.0x the mean alone on multi-turn by 1.8 points (9 of 10
    # seeds), on agent by 0.1 and on a working set twice the caches by 0.6; blocks were
    # balanced by their latest length, which undercounts young chats that will grow.
    "prefix_balance_factor": 1.0,
    "cache_balance_factor": 1.5,
    "occupancy_window": 256,
    "kv_saturation": 0.95,
    # Fleets larger than this are seen through a random sample of workers (plus every
    # holder of the prompt's prefix), so a decision costs the same at 8 or 512 workers.
    "sample": 16,
    # Hot prefixes get copies in proportion to their share of recent traffic; the queue
    # bound is too loose to spread them.
    # 1.5: a prefix with 60% of the traffic on 4 workers gets all 4, not 3; with 3 the
    # busiest worker took 1.33-1.44x its fair share in the simulator (3 seeds), with 4
    # 1.21-1.29x, for 1-2 points of hit rate.
    "hot_window": 64,
    "hot_replicas": 1.5,
    # Below that share a prefix is copied when it overloads its holders: their recent
    # requests over 1.2 fair shares, most of them this prefix's. Swept from 10% to 80% on
    # 4 simulated workers (5 seeds), the busiest worker took 1.15-1.20x fair on average
    # up to a 40% share, where the share rule alone let it take up to 1.58x (1.77x in the
    # worst seed; 1.42x with this rule); 1.1 and 1.05 did no better
    # (docs/benchmarks.md#hot-prefixes-at-every-share).
    "hot_load": 1.2,
}


class WorkingSet:
    """Per worker, the distinct prefixes among the last ``window`` requests, and their blocks.

    Each (worker, prefix) pair counts once, its blocks at the length of its latest request.
    Updates are O(1), so placement reads it without walking the fleet or the index.
    """

    def __init__(self, window: int):
        self.window = window
        self.total = 0  # blocks
        self._recent: deque[tuple[str, int | None]] = deque()  # (worker, route key)
        self._pairs: dict[tuple[str, int | None], list[int]] = {}  # -> [requests, blocks]
        self._blocks: Counter[str] = Counter()
        self._prefixes: Counter[str] = Counter()

    @property
    def prefixes(self) -> int:
        """Distinct (worker, prefix) pairs in the window."""
        return len(self._pairs)

    def add(self, url: str, key: int | None, blocks: int) -> None:
        pair = self._pairs.get((url, key))
        if pair is None:
            pair = self._pairs[(url, key)] = [0, 0]
            self._prefixes[url] += 1
        pair[0] += 1
        self._shift(url, blocks - pair[1])
        pair[1] = blocks
        self._recent.append((url, key))
        if len(self._recent) > self.window:
            old = self._recent.popleft()
            pair = self._pairs.get(old)
            if pair is not None:  # else its worker left the fleet
                pair[0] -= 1
                if not pair[0]:
                    self._forget(old)

    def of(self, url: str, excluding: int | None = None) -> int:
        """``url``'s working set in blocks, less the prefix ``excluding`` (placing it again
        adds nothing)."""
        return self._blocks[url] - self._pairs.get((url, excluding), (0, 0))[1]

    def prefixes_of(self, url: str, excluding: int | None = None) -> int:
        """How many distinct prefixes ``url`` served in the window, less ``excluding``."""
        return self._prefixes[url] - ((url, excluding) in self._pairs)

    def retain(self, keep: set[str]) -> None:
        for pair in [p for p in self._pairs if p[0] not in keep]:
            self._forget(pair)

    def _forget(self, pair: tuple[str, int | None]) -> None:
        self._shift(pair[0], -self._pairs.pop(pair)[1])
        self._prefixes[pair[0]] -= 1

    def _shift(self, url: str, blocks: int) -> None:
        self._blocks[url] += blocks
        self.total += blocks


class PrefixPolicy(Policy):
    name = "prefix"

    def __init__(self, deps: PolicyDeps, options: Mapping[str, Any] | None = None):
        super().__init__(deps, options)
        opts = {**_DEFAULTS, **self.options}
        self.load_weight = float(opts["load_weight"])
        self.balance_factor = float(opts["balance_factor"])
        self.balance_slack = int(opts["balance_slack"])
        self.external_request_tokens = int(opts["external_request_tokens"])
        self.ring = HashRing(int(opts["vnodes"]))
        self.cache_balance_factor = float(opts["cache_balance_factor"])
        self.prefix_balance_factor = float(opts["prefix_balance_factor"])
        self.kv_saturation = float(opts["kv_saturation"])
        self.sample = max(1, int(opts["sample"]))
        self.working_set = WorkingSet(max(1, int(opts["occupancy_window"])))
        self.hot = HotPrefixes(int(opts["hot_window"]), float(opts["hot_replicas"]),
                               float(opts["hot_load"]), self.working_set.window)
        self._by_url = PerCandidates(lambda workers: {w.url: w for w in workers})

    @classmethod
    def validate_options(cls, options: Mapping[str, Any], key: str) -> None:
        for k, v in options.items():
            if k not in _DEFAULTS:
                raise ConfigError(f"{key}.{k}", f"unknown option; valid: {', '.join(_DEFAULTS)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"{key}.{k}", f"expected a non-negative number, got {v!r}")
        for name in ("balance_factor", "cache_balance_factor", "prefix_balance_factor"):
            if options.get(name, 1.25) < 1:
                raise ConfigError(f"{key}.{name}", "must be at least 1")

    def queue_bounds(self, workers: Sequence[Worker], sample: Sequence[Worker]) -> tuple[int, int]:
        """(ring bound, eligibility bound) on queue depth, from the fleet's total queue.

        In fleets larger than the sample the total is estimated from the sample, which
        keeps the decision's cost flat in the fleet size.
        """
        total = sum(w.queue_depth for w in sample) * len(workers) / len(sample)
        ring = math.ceil(self.balance_factor * (total + 1) / len(workers))
        return ring, ring + self.balance_slack

    def load_tokens(self, w: Worker) -> float:
        external = max(0, w.vllm_running + w.vllm_waiting - w.in_flight_requests)
        return w.in_flight_tokens + external * self.external_request_tokens

    def place_new_prefix(self, key: int, by_url: dict[str, Worker], bound: int,
                         blocks: int) -> Worker:
        """Ring order from ``key``: the first worker under the queue ``bound`` whose working
        set is within the bounds and whose cache is not near full; else the first within
        the bounds; for a prompt of at least half the mean prefix's ``blocks``, else the
        first within the bounds over the queue bound; else the first with a cache not saturated;
        else the first."""
        ws, n = self.working_set, len(by_url)
        room = self.cache_balance_factor * ws.total / n
        prefix_room = self.prefix_balance_factor * ws.prefixes / n
        # A long prefix stays where it is first placed (moving it later recomputes it all),
        # so its place is chosen for balance over a queue, which passes. On 4 real workers
        # the 16th of 16 groups went to a worker with 4 when the one with 3 was briefly
        # busy, in 3 of 8 shared-prefix runs: 1.25x fair load for the rest of the run.
        settles = 2 * blocks * ws.prefixes >= ws.total > 0  # half the mean: lengths vary a little
        first = balanced = busy = free = None
        for url in self.ring.walk(key, by_url):
            w = by_url[url]
            first = first or w
            fits = ws.prefixes_of(url, excluding=key) <= prefix_room and ws.of(url, excluding=key) <= room
            if w.queue_depth >= bound:
                if fits and settles:
                    busy = busy or w
                continue
            if fits:
                if w.kv_usage < self.kv_saturation - 0.05:
                    return w
                balanced = balanced or w
            if w.kv_usage < self.kv_saturation:
                free = free or w
        # A full cache is transient (running requests finish); where a prefix lives is not.
        # The old order (any unsaturated worker before a balanced one) fell back to plain
        # consistent hashing when every cache was near full: 10 / 7 / 4 / 3 groups on 4
        # real workers with a working set twice the caches. The queue bound stays the
        # ring's: with the looser eligibility bound, new chats went to busy workers and
        # their second turns left for idle ones (real multi-turn tight 0.529, 6 chats
        # moved at turn 2 against 0-1 in four earlier runs).
        return balanced or busy or free or first  # type: ignore[return-value]  # the walk sees every worker

    def on_workers_changed(self, workers: Sequence[Worker]) -> None:
        super().on_workers_changed(workers)
        self.ring.forget(w.url for w in workers)
        self.working_set.retain({w.url for w in workers})

    def on_dispatch(self, worker: Worker, ctx: RequestContext) -> None:
        super().on_dispatch(worker, ctx)
        key = route_key(ctx)
        self.hot.record(key, worker.url, ctx.block_keys)
        if key is not None:  # a prompt under one block, with no session, leaves nothing to reuse
            self.working_set.add(worker.url, key, len(ctx.block_keys))

    def select(self, workers: Sequence[Worker], ctx: RequestContext) -> Worker | None:
        if not workers:
            return None
        rng = self.deps.rng
        by_url = self._by_url.of(workers)
        sample = workers if len(workers) <= self.sample else rng.sample(workers, self.sample)
        ring_bound, bound = self.queue_bounds(workers, sample)

        key = route_key(ctx)
        hot_key = self.hot.is_hot(key, len(workers))
        # a worker holding a quarter of this prompt or more keeps it while its KV cache is
        # saturated (vLLM queues it): elsewhere that part is recomputed and evicts others'.
        # With half, agents near the context limit, whose shared tool schema is half the
        # prompt, left their history: agent tight +1.6 points in the simulator (5 seeds),
        # multi-turn tight -0.1 and the 2x working set unchanged.
        deep = math.inf if hot_key else ctx.prompt_tokens / (4 * ctx.block_size)

        def eligible(w: Worker, depth: int = 0) -> bool:
            return w.queue_depth < bound and (w.kv_usage < self.kv_saturation or depth >= deep)

        matched = {u: n for u, n in self.deps.index.holders(ctx.block_keys, by_url).items()
                   if eligible(by_url[u], n)}
        # in URL order: the index's sets iterate in an order that changes with Python's
        # string hashing, and ties would break differently in every run of the simulator
        holders = [by_url[u] for u in sorted(matched)]
        others = [w for w in sample if w.url not in matched and eligible(w)]
        # only while no holder has more of this prompt than the others (a chat history); one
        # block more is two questions that begin alike, not a history worth pinning to
        depths = matched.values()
        spreadable = bool(depths) and max(depths) - min(depths) <= 1
        hot = self.hot.choose(key, len(workers), holders, others, min(depths), rng) if spreadable else None
        if hot is not None:
            return hot
        if not matched and key is not None:
            return self.place_new_prefix(key, by_url, ring_bound, len(ctx.block_keys))
        # holders compete with the least loaded of the others (all of them in small fleets)
        pool = holders + others or [w for w in sample if w.queue_depth < bound] or list(sample)
        scores = [
            max(0, ctx.prompt_tokens - matched.get(w.url, 0) * ctx.block_size)
            + self.load_weight * self.load_tokens(w)
            for w in pool
        ]
        return pick_random_min(pool, scores, rng)
