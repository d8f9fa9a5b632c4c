"""``kvroute bench agreement``: would two exact-mode replicas pick the same worker?

Benchmark traffic runs through real kvroute replicas (by default two exact-mode ``prefix``
replicas, the client alternating between them). In this process, two more independent
"replica views" each subscribe to every worker's KV events on their own (one
``EventHub`` + ``ExactIndex`` each, exactly as a replica does) and each owns a ``prefix``
policy with its own random generator. Just before a request is sent, both views run
``select()`` on it with zero load on their workers, so only their knowledge of the caches
decides. Nothing is dispatched to measure this, so the caches see only the real traffic.

Per request this records both choices, whether each view saw a miss (ring placement),
one best worker, or a tie broken at random, whether both views matched the same cached
prefix on every worker, and the worker the serving replica really chose
(``x-kvroute-worker``). The views hold only what events confirmed: unlike a real replica
they add no speculative entries for dispatches, and carry no load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvroute.benchmarks.runner import run_standalone
from kvroute.benchmarks.workloads import TraceRecord, add_workload_args, iter_records, workload_from_args

log = logging.getLogger(__name__)

MISS, UNIQUE, TIE = "miss", "unique", "tie"


@dataclass
class Decision:
    a: str  # view A's choice (worker URL)
    b: str  # view B's choice
    kind_a: str  # miss | unique | tie
    kind_b: str
    tied_a: int  # workers tied at view A's best score (0 on a miss)
    tied_b: int
    same_view: bool  # both views matched the same number of blocks on every worker
    matched_blocks: int  # view A's longest cached prefix over all workers, in blocks
    router: str | None = None  # what the serving replica chose (response header)

    @property
    def agree(self) -> bool:
        return self.a == self.b

    @property
    def random_tie(self) -> bool:
        return TIE in (self.kind_a, self.kind_b)


def classify(matched: Mapping[str, int], prompt_tokens: int, block_size: int) -> tuple[str, int]:
    """How ``prefix`` decides with zero load: a miss, one best worker, or a tie of N.

    With no load the score is the uncached prompt tokens alone, as in ``PrefixPolicy``.
    """
    if not any(matched.values()):
        return MISS, 0
    scores = [max(0, prompt_tokens - m * block_size) for m in matched.values()]
    tied = scores.count(min(scores))
    return (TIE if tied > 1 else UNIQUE), tied


def summarize(decisions: Sequence[Decision]) -> dict[str, Any]:
    n = len(decisions)

    def rate(xs: Sequence[Decision]) -> dict[str, Any]:
        agree = sum(d.agree for d in xs)
        return {"requests": len(xs), "agree": agree, "agreement": round(agree / len(xs), 4) if xs else None}

    ties = [d for d in decisions if d.random_tie]
    no_ties = [d for d in decisions if not d.random_tie]
    with_router = [d for d in decisions if d.router is not None]
    return {
        "requests": n,
        **{k: v for k, v in rate(decisions).items() if k != "requests"},
        "random_ties": len(ties),
        "ties": rate(ties),
        "without_ties": rate(no_ties),
        "by_kind": {
            kind: rate([d for d in decisions if d.kind_a == kind and d.kind_b == kind])
            for kind in (MISS, UNIQUE, TIE)
        },
        "kinds_differ": sum(d.kind_a != d.kind_b for d in decisions),
        "same_view": sum(d.same_view for d in decisions),
        "same_view_rate": round(sum(d.same_view for d in decisions) / n, 4) if n else None,
        "router_equals_view_a": sum(d.router == d.a for d in with_router),
        "router_known": len(with_router),
    }


def to_markdown(header: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    lines = [
        "# Replica agreement (exact mode)",
        "",
        f"`{header['command']}`",
        "",
        f"Serving router: `{header['router']}`; hit rate (vLLM counters) "
        f"{pct(header.get('hit_rate'))}; {header.get('completed')} requests completed, "
        f"{header.get('errors')} errors.",
        "",
        "| decisions | requests | same choice | agreement |",
        "|---|---:|---:|---:|",
        f"| all | {summary['requests']} | {summary['agree']} | {pct(summary['agreement'])} |",
        f"| without random ties | {summary['without_ties']['requests']} | {summary['without_ties']['agree']} "
        f"| {pct(summary['without_ties']['agreement'])} |",
        f"| random tie in either view | {summary['ties']['requests']} | {summary['ties']['agree']} "
        f"| {pct(summary['ties']['agreement'])} |",
    ]
    for kind, r in summary["by_kind"].items():
        lines.append(f"| both views: {kind} | {r['requests']} | {r['agree']} | {pct(r['agreement'])} |")
    lines += [
        "",
        f"- Views saw different kinds of decision (e.g. miss vs hit): {summary['kinds_differ']}",
        f"- Views matched the same prefix on every worker: {summary['same_view']} "
        f"({pct(summary['same_view_rate'])})",
        f"- Serving replica's choice equal to view A's: {summary['router_equals_view_a']} of "
        f"{summary['router_known']} (it also counts load and its own in-flight requests)",
    ]
    for name, c in header.get("views", {}).items():
        lines.append(f"- View {name}: events {c['events']}, gaps {c['gaps']}, "
                     f"confirmed blocks per worker at the end {c.get('blocks_per_worker')}")
    for r, st in enumerate(header.get("replica_states") or []):
        if st is not None:
            lines.append(f"- Serving replica {r}: mode {st['mode']}, events {st['kv_events']}, gaps {st['gaps']}")
    lines.append("")
    return "\n".join(lines)


class CountingCounter:
    """An ``EventCounter`` that keeps counts: events by kind (incl. unresolved, invalid), gaps."""

    def __init__(self) -> None:
        self.events: dict[str, int] = {}
        self.gaps = 0

    def event(self, worker: str, kind: str, n: int = 1) -> None:
        self.events[kind] = self.events.get(kind, 0) + n

    def gap(self, worker: str) -> None:
        self.gaps += 1

    def as_dict(self) -> dict[str, Any]:
        return {"events": dict(sorted(self.events.items())), "gaps": self.gaps}


class ReplicaView:
    """One replica's knowledge: its own event subscriptions, exact index and policy."""

    def __init__(self, urls: Sequence[str], kv_cfg, capacity_blocks: int, seed: int, model: str):
        from kvroute.router.kv_events import EventHub
        from kvroute.router.kv_index import ExactIndex
        from kvroute.router.policies.base import PolicyDeps
        from kvroute.router.policies.registry import create_policy
        from kvroute.router.upstream.workers import Worker

        self.urls = list(urls)
        self.kv_cfg = kv_cfg
        self.index = ExactIndex(capacity_blocks, kv_cfg.speculative_ttl_s)
        self.counter = CountingCounter()
        self.hub = EventHub(self.counter)
        self.policy = create_policy("prefix", PolicyDeps(index=self.index, rng=random.Random(seed)))
        self.workers = [Worker(url=u, model=model) for u in self.urls]
        self.policy.on_workers_changed(self.workers)

    def start(self) -> None:
        self.hub.sync(self.index, self.kv_cfg, self.urls)

    def decide(self, ctx) -> tuple[str, str, int, dict[str, int]]:
        matched = self.index.match(ctx.block_keys, self.urls)
        kind, tied = classify(matched, ctx.prompt_tokens, ctx.block_size)
        chosen = self.policy.select(self.workers, ctx)
        return chosen.url, kind, tied, matched

    async def close(self) -> None:
        await self.hub.close()


def _context(tok, rec: TraceRecord, model: str, block_size: int):
    from kvroute.router.policies.base import RequestContext
    from kvroute.router.prefix import chain_keys
    from kvroute.router.routes import expected_max_tokens

    ids = tok.chat_ids(rec.body["messages"], rec.body.get("tools"))
    user = rec.body.get("user")
    return RequestContext(
        model=model,
        block_keys=tuple(chain_keys(ids, block_size)),
        block_size=block_size,
        prompt_tokens=len(ids),
        max_tokens=expected_max_tokens(rec.body.get("max_completion_tokens") or rec.body.get("max_tokens")),
        session_key=user if isinstance(user, str) else None,
    )


async def measure(
    records: Sequence[TraceRecord],
    router_urls: Sequence[str],
    worker_urls: Sequence[str],
    kv_cfg,
    tokenizer_dir: str,
    model: str,
    block_size: int,
    concurrency: int,
    capacity_blocks: int,
    seed: int,
    warm_s: float = 2.0,
    progress=None,
):
    """Drive ``records`` through the replicas (alternating) while two views decide each."""
    import itertools

    import aiohttp

    from kvroute.benchmarks.runner import drive, scrape_fleet
    from kvroute.router.prefix import PromptTokenizer

    tok = PromptTokenizer(tokenizer_dir)
    views = [ReplicaView(worker_urls, kv_cfg, capacity_blocks, seed + k, model) for k in (1, 2)]
    for v in views:
        v.start()
    await asyncio.sleep(warm_s)  # subscriptions connect and read the replay buffers
    decisions: dict[int, Decision] = {}
    replicas = itertools.cycle(router_urls)

    def target(rec: TraceRecord) -> str:
        ctx = _context(tok, rec, model, block_size)
        (a, ka, ta, ma), (b, kb, tb, mb) = (v.decide(ctx) for v in views)
        decisions[id(rec)] = Decision(a, b, ka, kb, ta, tb, ma == mb, max(ma.values(), default=0))
        return next(replicas)

    try:
        async with aiohttp.ClientSession() as s:
            before = await scrape_fleet(s, worker_urls)
        results, elapsed = await drive(records, target, concurrency, progress=progress)
        await asyncio.sleep(1.0)
        async with aiohttp.ClientSession() as s:
            after = await scrape_fleet(s, worker_urls)
    finally:
        for v in views:
            await v.close()
    counts = [v.counter.as_dict() for v in views]
    for v, c in zip(views, counts):
        c["blocks_per_worker"] = [v.index.blocks_of(u) for u in worker_urls]
    out = []
    for rec, res in zip(records, results):
        d = decisions[id(rec)]
        d.router = res.worker
        out.append(d)
    return out, results, elapsed, before, after, counts


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``kvroute bench agreement``, the workload's included."""
    p.add_argument("--worker-url", action="append", required=True, help="a worker (repeat per worker)")
    p.add_argument("--events-port-offset", type=int, required=True,
                   help="workers publish KV events on HTTP port + this (replay endpoint: + 1000 more)")
    p.add_argument("--tokenizer", default=None, help="the model's tokenizer folder (default: the tiny model)")
    p.add_argument("--router", default="prefix?kv_events=1&replicas=2", help="the serving kvroute router spec")
    p.add_argument("--router-port", type=int, default=8290)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--index-blocks", type=int, default=100_000, help="views' safety cap per worker")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out", default="bench-out/agreement")
    p.add_argument("--log-level", default="WARNING")
    add_workload_args(p)


def main(argv: list[str] | None = None) -> int:
    """``kvroute bench agreement`` on its own (``argv``: the arguments after ``agreement``)."""
    return run_standalone("agreement", __doc__, add_arguments, run, argv)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``kvroute bench agreement`` with parsed ``args``; ``argv`` is recorded as the command."""
    from kvroute.benchmarks.backends.routers import parse_router
    from kvroute.benchmarks.backends.urls import (
        RealFleet,
        check_workers,
        replica_ports,
        router_state,
        start_router,
        urls_kv_events,
    )
    from kvroute.benchmarks.runner import progress_bar, to_router_run
    from kvroute.router.config import KvEventsConfig

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.tokenizer is None:
        from kvroute.router.local.tinymodel import build_tiny_model

        args.tokenizer = str(build_tiny_model())
    kv = urls_kv_events(args.events_port_offset)
    fleet = RealFleet(tuple(args.worker_url), args.model, args.tokenizer, args.block_size, kv)
    check_workers(fleet.urls)
    rspec = parse_router(args.router)
    if rspec.kind != "kvroute":
        raise SystemExit("--router must be a kvroute policy")
    spec = workload_from_args(args)
    records = list(iter_records(spec.with_nonce(f"agreement|{time.time_ns()}")))
    out = Path(args.out)
    procs = start_router(rspec, fleet, out / "logs", replica_ports(args.router_port, 0, 1, rspec))
    bar = progress_bar(len(records), "agreement")
    try:
        decisions, results, elapsed, before, after, counts = asyncio.run(measure(
            records, [p.url for p in procs], fleet.urls, KvEventsConfig(**kv), args.tokenizer, args.model,
            args.block_size, args.concurrency, args.index_blocks, args.seed, progress=bar.update))
        replica_states = [router_state(p.url) for p in procs]
    finally:
        bar.close()
        for p in procs:
            p.stop()
    router_run = to_router_run(args.router, results, elapsed, before, after)
    header = {
        "command": "kvroute bench agreement " + shlex.join(argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "router": args.router,
        "replicas": len(procs),
        "workers": list(fleet.urls),
        "workload": spec.describe(),
        "hit_rate": round(router_run.hit_rate, 4),
        "completed": router_run.completed,
        "errors": router_run.errors,
        "per_worker_requests": router_run.per_worker_requests,
        "duration_s": round(elapsed, 2),
        "views": {"A": counts[0], "B": counts[1]},
        "replica_states": replica_states,
    }
    summary = summarize(decisions)
    out.mkdir(parents=True, exist_ok=True)
    doc = {**header, "summary": summary, "decisions": [asdict(d) for d in decisions]}
    (out / "agreement.json").write_text(json.dumps(doc, indent=2))
    md = to_markdown(header, summary)
    (out / "agreement.md").write_text(md)
    print(md)
    return 1 if router_run.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
