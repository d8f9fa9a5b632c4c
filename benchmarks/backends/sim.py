"""Discrete-event simulation of a vLLM fleet behind kvroute's real routing policies.

The simulator plays the router framework's part around the policy code it imports:
for each arrival it builds a ``RequestContext`` (block keys from ``router.prefix.
chain_keys``), calls ``Policy.select`` on ``router.upstream.workers.Worker`` objects, then
``on_dispatch``; it keeps ``in_flight_requests``/``in_flight_tokens`` as the framework
does, copies ``vllm_running``/``vllm_waiting``/``kv_usage`` into the workers every
``scrape_s`` seconds as the metrics scraper would, and calls ``on_complete`` when a
request finishes. Workers are ``SimWorker`` (cache, queue and batching model).

Exact mode (``exact=True``, the bench's ``prefix?kv_events=1``): the policy sees an
``ExactIndex`` fed by the simulated workers' KV events (stored when a request's prefill
is computed, removed on eviction) instead of the speculative index, on the simulated
clock, as the router's subscribers would feed it.

An "oracle" pins each workload group to a worker by hand (groups in order of first
appearance, round robin over workers); it bounds what any router can reach.

Figures beyond hit rate: wall-clock time of each ``select`` call (decision time, which
should not grow much with fleet size) and the prefix index's entry count and approximate
memory (bounded by index capacity times workers).

Arrivals are open loop (the workload's ``t``) or closed loop (``concurrency`` requests
in flight, the next sent when one finishes), matching the real-fleet runner.
"""

from __future__ import annotations

import heapq
import itertools
import random
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvroute.benchmarks.backends.simkeys import KeyCache
from kvroute.benchmarks.backends.simworker import SimRequest, SimWorker, Timing
from kvroute.benchmarks.results import RouterRun, percentile
from kvroute.benchmarks.workloads import TraceRecord
from kvroute.router.config import ModelConfig
from kvroute.router.index import PrefixIndex
from kvroute.router.kv_index import ExactIndex
from kvroute.router.policies.base import PolicyDeps, RequestContext
from kvroute.router.policies.registry import create_policy
from kvroute.router.upstream.workers import Worker

ORACLE = "oracle"


@dataclass(frozen=True)
class SimConfig:
    workers: int = 8
    capacity_blocks: int = 320  # per worker
    block_size: int = 32
    index_capacity_blocks: int | None = None  # the router's kv_capacity_blocks; None: same
    timing: Timing = field(default_factory=Timing)
    scrape_s: float = 1.0  # 0: never copy vLLM load into the router's workers
    concurrency: int = 0  # >0: closed loop
    # Proposal, not what router.proxy does today: at the first token, drop the request's
    # prefill from its worker's in_flight_tokens (the prefill is done; only decode is left).
    release_prefill: bool = False
    seed: int = 0
    model: str = "tiny"


class _Chooser:
    """The real policy, or the oracle pin; both seen through one small interface."""

    def __init__(self, name: str, cfg: SimConfig, options: Mapping[str, Any] | None,
                 exact: bool = False, clock: Callable[[], float] = time.monotonic):
        self.name = name  # a kvroute policy name, or "oracle"
        cap = cfg.index_capacity_blocks or cfg.capacity_blocks
        self.index: PrefixIndex | ExactIndex = PrefixIndex(cap)
        if exact:  # the router's safety cap per worker; the events bound it
            safety = cfg.index_capacity_blocks or ModelConfig.kv_capacity_blocks
            self.index = ExactIndex(safety, clock=clock)
        self.policy = None
        if name != ORACLE:
            deps = PolicyDeps(index=self.index, rng=random.Random(cfg.seed))
            self.policy = create_policy(name, deps, options)
        self._pins: dict[str, int] = {}

    def select(self, workers: Sequence[Worker], ctx: RequestContext, group: str) -> Worker:
        if self.policy is None:
            i = self._pins.setdefault(group, len(self._pins) % len(workers))
            return workers[i]
        return self.policy.select(workers, ctx) or workers[0]

    def predicted_cached(self, worker: Worker, ctx: RequestContext) -> int:
        if self.policy is None:
            return 0
        return self.policy.predicted_cached_tokens(worker, ctx)

    def dispatched(self, worker: Worker, ctx: RequestContext) -> None:
        if self.policy is not None:
            self.policy.on_dispatch(worker, ctx)

    def completed(self, worker: Worker, ctx: RequestContext) -> None:
        if self.policy is not None:
            self.policy.on_complete(worker, ctx, True)


def deep_sizeof(index: PrefixIndex | ExactIndex) -> int:
    """Approximate bytes held by an index (containers and their int keys)."""
    total = sys.getsizeof(index)
    holders = index._holders  # noqa: SLF001 - measuring, not using
    total += sys.getsizeof(holders)
    for key, s in holders.items():
        total += sys.getsizeof(key) + sys.getsizeof(s)
    if isinstance(index, ExactIndex):
        lrus = [lru for d in (index._confirmed, index._speculative, index._settled)  # noqa: SLF001
                for lru in d.values()]
    else:
        lrus = list(index._lru.values())  # noqa: SLF001
    for lru in lrus:
        total += sys.getsizeof(lru) + 48 * len(lru)  # ~one linked-list node per entry
    return total


@dataclass
class _Flight:
    worker: int
    ctx: RequestContext
    load_tokens: int
    arrival: float
    prefill_tokens: int = 0
    replica: int = 0


def simulate(
    records: Iterable[TraceRecord],
    router: str,
    cfg: SimConfig,
    keys: KeyCache,
    options: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    policy: str | None = None,
    exact: bool = False,
    replicas: int = 1,
) -> RouterRun:
    """Run ``records`` through ``cfg.workers`` simulated workers.

    ``router`` names the run; ``policy`` (default: ``router``) is the kvroute policy used,
    or "oracle"; ``exact``: the policy's index follows the workers' KV events.
    ``replicas``: that many routers (or ``--procs`` processes), each with its own index and
    its own in-flight counts, taking arrivals in turn; vLLM's scraped load and (exact) the
    KV events reach all of them."""
    now = 0.0
    choosers = [_Chooser(policy or router, cfg, options, exact, clock=lambda: now) for _ in range(replicas)]
    chooser = choosers[0]
    listener = None
    if exact:
        def listener(url: str, kind: str, keys: list[int]) -> None:
            for c in choosers:
                (c.index.stored if kind == "stored" else c.index.removed)(url, keys)

    sims = [
        SimWorker(f"http://sim-{i}", cfg.capacity_blocks, cfg.block_size, cfg.timing, listener)
        for i in range(cfg.workers)
    ]
    views = [tuple(Worker(url=s.url, model=cfg.model, block_size=cfg.block_size) for s in sims) for _ in choosers]
    workers = views[0]
    by_url = {w.url: i for i, w in enumerate(workers)}
    for c, view in zip(choosers, views):
        if c.policy is not None:
            c.policy.on_workers_changed(view)
    turns = itertools.count()

    events: list[tuple[float, int, int, Any]] = []  # (time, seq, kind, payload)
    seq = itertools.count()
    ARRIVE, STEP, SCRAPE = 0, 1, 2  # noqa: N806 - local enum
    stream: Iterator[TraceRecord] = iter(records)
    flights: dict[int, _Flight] = {}
    ttft = array("d")
    latency = array("d")
    decide_ns = array("q")
    per_worker = [0] * cfg.workers
    rids = itertools.count()
    pending_steps: dict[int, list] = {}
    closed = cfg.concurrency > 0
    last_done = 0.0

    def push_next(at: float | None) -> bool:
        rec = next(stream, None)
        if rec is None:
            return False
        when = at if closed and at is not None else rec.t  # closed loop ignores rec.t
        heapq.heappush(events, (when, next(seq), ARRIVE, rec))
        return True

    if closed:
        for _ in range(cfg.concurrency):
            if not push_next(0.0):
                break
    else:
        push_next(None)
    if cfg.scrape_s > 0:
        heapq.heappush(events, (cfg.scrape_s, next(seq), SCRAPE, None))

    def start_step(i: int, at: float) -> None:
        plan = sims[i].plan_step()
        if plan is None:
            sims[i].busy_until = None
            return
        duration, chunks = plan
        sims[i].busy_until = at + duration
        pending_steps[i] = chunks
        heapq.heappush(events, (at + duration, next(seq), STEP, i))

    done_count = 0
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == ARRIVE:
            rec: TraceRecord = payload
            if not closed:
                push_next(None)
            block_keys, n_tokens = keys.keys(rec.body["messages"])
            max_tokens = int(rec.body.get("max_tokens") or 16)
            ctx = RequestContext(
                model=cfg.model,
                block_keys=block_keys,
                block_size=cfg.block_size,
                prompt_tokens=n_tokens,
                max_tokens=max_tokens,
                session_key=rec.session,
            )
            r = next(turns) % len(choosers)
            t0 = time.perf_counter_ns()
            w = choosers[r].select(views[r], ctx, rec.group)
            decide_ns.append(time.perf_counter_ns() - t0)
            load = (
                max(0, n_tokens - choosers[r].predicted_cached(w, ctx)) + max_tokens
            )  # as router.proxy
            choosers[r].dispatched(w, ctx)
            w.in_flight_requests += 1
            w.in_flight_tokens += load
            i = by_url[w.url]
            per_worker[i] += 1
            rid = next(rids)
            flights[rid] = _Flight(i, ctx, load, now, load - max_tokens, r)
            sims[i].submit(SimRequest(rid, block_keys, n_tokens, max_tokens, now))
            if sims[i].busy_until is None:
                start_step(i, now)
        elif kind == STEP:
            i = payload
            finished, started = sims[i].finish_step(now, pending_steps.pop(i))
            if cfg.release_prefill:
                for r in started:
                    f = flights[r.rid]
                    views[f.replica][f.worker].in_flight_tokens -= f.prefill_tokens
                    f.load_tokens -= f.prefill_tokens
            for r in finished:
                f = flights.pop(r.rid)
                w = views[f.replica][f.worker]
                w.in_flight_requests -= 1
                w.in_flight_tokens -= f.load_tokens
                choosers[f.replica].completed(w, f.ctx)
                ttft.append(r.first_token_at - r.arrival)
                latency.append(r.done_at - r.arrival)
                done_count += 1
                last_done = now
                if closed:
                    push_next(now)
            if progress is not None and finished:
                progress(len(finished))
            start_step(i, now)
        elif kind == SCRAPE:
            for view in views:
                for w, s in zip(view, sims):
                    w.vllm_running = s.num_running
                    w.vllm_waiting = s.num_waiting
                    w.kv_usage = s.kv_usage()
            if len(events) > 0:
                heapq.heappush(events, (now + cfg.scrape_s, next(seq), SCRAPE, None))

    extra: dict[str, Any] = {}
    if exact:  # events kept the index equal to every worker's cache (0 = exact)
        extra["index_mismatch_blocks"] = sum(
            len(chooser.index.confirmed_blocks(s.url) ^ (set(s.refs) | set(s.free))) for s in sims)
    queries = sum(s.prefix_queries for s in sims)
    hits = sum(s.prefix_hits for s in sims)
    dec_us = [x / 1000 for x in decide_ns]
    return RouterRun(
        router=router,
        queries=queries,
        hits=hits,
        per_worker_requests=per_worker,
        per_worker_hit_rate=[
            s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0 for s in sims
        ],
        ttft_s=list(ttft),
        latency_s=list(latency),
        completed=done_count,
        errors=0,
        duration_s=last_done,
        extra={
            "decision_us_p50": _r(percentile(dec_us, 50)),
            "decision_us_p99": _r(percentile(dec_us, 99)),
            "decision_us_mean": _r(sum(dec_us) / len(dec_us) if dec_us else None),
            "index_entries": len(chooser.index),
            "index_bytes_approx": deep_sizeof(chooser.index),
            "evictions": sum(s.evictions for s in sims),
            **extra,
        },
    )


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)
