"""Compare routers in front of a fleet of real vLLM workers given by URL.

First the fleet is warmed (``warm_fleet``). Then for each router in turn: start it (unless
it runs on the client side), wait until it answers, send one warm-up request, snapshot
every worker's ``/metrics``, drive the workload through it, snapshot again, stop it. Hit
rates and per-worker request counts are the deltas of vLLM's own counters, so they do not
depend on what a router reports.

Each router gets the workload with its own nonce (fresh prefixes, identical structure),
so no router inherits KV blocks that the previous one left in the workers' caches.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from kvroute.benchmarks.backends.routers import RouterProcess, RouterSpec, http_ok, parse_router, router_command
from kvroute.benchmarks.results import RouterRun
from kvroute.benchmarks.runner import drive, scrape_fleet, to_router_run, write_request_log
from kvroute.benchmarks.workloads import TraceRecord, WorkloadSpec, iter_records

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RealFleet:
    urls: tuple[str, ...]
    model: str = "tiny"  # the served model name
    tokenizer: str | None = None  # for kvroute's exact mode
    block_size: int | None = None
    # where workers publish KV events, as a kvroute config's ``kv_events:`` takes it
    # (``port_offset``, ``replay_port_offset``); None: exact mode is not available
    kv_events: dict | None = None


def urls_kv_events(offset: int | None) -> dict | None:
    """The ``kv_events:`` config of a fleet whose events port is HTTP port + ``offset``."""
    if offset is None:
        return None
    from kvroute.router.local.fleet import REPLAY_PORT_OFFSET

    return {"port_offset": offset, "replay_port_offset": offset + REPLAY_PORT_OFFSET}


def check_workers(urls: Sequence[str]) -> None:
    bad = [u for u in urls if not http_ok(f"{u}/health")]
    if bad:
        raise RuntimeError(f"workers not healthy: {', '.join(bad)}")


def target_for(
    kind: str, urls: Sequence[str], router_url: str | Sequence[str] | None
) -> Callable[[TraceRecord], str]:
    """Where each request goes: a pinned worker per group (oracle), the next worker
    (direct), or the router; with several router replicas, the next replica."""
    if kind == "oracle":
        pins: dict[str, str] = {}

        def oracle(rec: TraceRecord) -> str:
            return pins.setdefault(rec.group, urls[len(pins) % len(urls)])

        return oracle
    if kind == "direct":
        cycle = itertools.cycle(urls)
        return lambda rec: next(cycle)
    assert router_url is not None
    if isinstance(router_url, str):
        return lambda rec: router_url
    replicas = itertools.cycle(router_url)  # several replicas: alternate, request by request
    return lambda rec: next(replicas)


async def _snapshot(urls: Sequence[str]):
    async with aiohttp.ClientSession() as session:
        return await scrape_fleet(session, urls)


def _warm_up(base: str, model: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 1}

    async def go() -> None:
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"{base}/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=60)
            ) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"warm-up through {base} failed: HTTP {resp.status}")

    asyncio.run(go())


def parse_router_state(health: dict, metrics_text: str) -> dict:
    """What a kvroute replica reports about itself: its routing mode, the KV events it saw,
    and the prompt tokens it expected to be cached against those vLLM reported cached
    (how good its index was)."""
    from prometheus_client.parser import text_string_to_metric_families

    modes = sorted({m.get("mode") for m in health.get("models", {}).values() if isinstance(m, dict)} - {None})
    events: dict[str, float] = {}
    totals = {"gaps": 0.0, "predicted_cached_tokens": 0.0, "cached_tokens": 0.0}
    sums = {
        "kvroute_kv_event_gaps_total": "gaps",
        "kvroute_worker_predicted_cached_tokens_total": "predicted_cached_tokens",
        "kvroute_worker_cached_prompt_tokens_total": "cached_tokens",
    }
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "kvroute_kv_events_total":
                kind = s.labels.get("type", "?")
                events[kind] = events.get(kind, 0.0) + s.value
            elif s.name in sums:
                totals[sums[s.name]] += s.value
    p50 = histogram_quantile(added_buckets(metrics_text), 0.5)
    return {"mode": ",".join(modes), "kv_events": {k: int(v) for k, v in sorted(events.items())},
            **{k: int(v) for k, v in totals.items()},
            "added_ms_p50": None if p50 is None else round(p50 * 1e3, 3)}


def added_buckets(metrics_text: str) -> dict[float, float]:
    """``kvroute_router_added_seconds`` summed over its labels: upper bound -> cumulative
    count (empty for a router that does not export it)."""
    from prometheus_client.parser import text_string_to_metric_families

    added: dict[float, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "kvroute_router_added_seconds_bucket":
                le = float(s.labels["le"])
                added[le] = added.get(le, 0.0) + s.value
    return added


def histogram_quantile(buckets: dict[float, float], q: float) -> float | None:
    """Quantile ``q`` of a Prometheus histogram (upper bound -> cumulative count), linear
    within the bucket it falls in, as PromQL's histogram_quantile; None when it is empty."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if le == float("inf"):
                return lower  # past the last finite bound: its value is all that is known
            return lower + (le - lower) * (rank - below) / max(buckets[le] - below, 1e-12)
        lower, below = le, buckets[le]
    return lower


def router_state(url: str) -> dict | None:
    """``parse_router_state`` of a running kvroute replica; None if it does not answer."""
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
            health = json.loads(resp.read())
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return None
    return parse_router_state(health, text)


def replica_ports(base_port: int, i: int, n_routers: int, rspec: RouterSpec) -> list[int]:
    """Router ``i`` of ``n_routers`` listens on ``base_port + i``; replica r on ``+ r * n_routers``."""
    kinds = 1 if rspec.kind != "kvroute" else rspec.replicas
    return [base_port + i + r * n_routers for r in range(kinds)]


def _safe(name: str) -> str:
    """A router name as a file name: ``prefix?kv_events=1`` -> ``prefix-kv_events-1``."""
    return "".join(c if c.isalnum() or c in "._" else "-" for c in name)


def start_router(
    rspec: RouterSpec, fleet: RealFleet, log_dir: Path, ports: Sequence[int]
) -> list[RouterProcess]:
    """Start one process per port (replicas share the config), wait for each, warm each up."""
    procs: list[RouterProcess] = []
    safe = _safe(rspec.name)
    try:
        for r, port in enumerate(ports):
            cmd = router_command(
                rspec, port, fleet.urls, fleet.model, fleet.tokenizer, fleet.block_size, log_dir,
                kv_events=fleet.kv_events,
            )
            suffix = f"-r{r}" if len(ports) > 1 else ""
            procs.append(RouterProcess(cmd, port, log_dir / f"router-{safe}{suffix}.log"))
        for proc in procs:
            proc.wait_ready()
            _warm_up(proc.url, fleet.model)
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return procs


WARM_PER_GROUP = 2
WARM_PER_WORKER = 8


def warm_fleet(fleet: RealFleet, spec: WorkloadSpec) -> int:
    """The workload's first requests of each group (``WARM_PER_GROUP``, at most
    ``WARM_PER_WORKER`` per worker) under a nonce of their own, sent straight to the worker
    the oracle pins the group to, as many in flight as there are workers. A new worker's
    first prefills of these lengths and its first writes to KV memory are slower; warmed
    here, they do not land on whichever router is measured first. Returns the number of
    requests sent."""
    picked: list[TraceRecord] = []
    per_group: dict[str, int] = {}
    for rec in iter_records(spec.with_nonce(f"{spec.nonce}|warm-up|{time.time_ns()}")):
        if len(picked) >= WARM_PER_WORKER * len(fleet.urls):
            break
        if per_group.get(rec.group, 0) < WARM_PER_GROUP:
            per_group[rec.group] = per_group.get(rec.group, 0) + 1
            picked.append(rec)
    results, _ = asyncio.run(drive(picked, target_for("oracle", fleet.urls, None), len(fleet.urls)))
    failed = sum(not r.ok for r in results)
    if failed:
        log.warning("warming the fleet: %d of %d requests failed", failed, len(picked))
    return len(picked)


def compare_routers(
    fleet: RealFleet,
    routers: Sequence[str],
    spec: WorkloadSpec,
    concurrency: int,
    log_dir: Path,
    base_port: int = 8250,
    progress: Callable[[int], None] | None = None,
    settle_s: float = 1.0,
    warm: bool = True,
) -> list[RouterRun]:
    """``warm``: warm the fleet first (``warm_fleet``); off for a fleet already warmed with
    this workload's shape (a sweep's later points)."""
    check_workers(fleet.urls)
    if warm:
        warm_fleet(fleet, spec)
    runs: list[RouterRun] = []
    for i, name in enumerate(routers):
        rspec = parse_router(name)
        records = list(iter_records(spec.with_nonce(f"{spec.nonce}|{name}|{time.time_ns()}")))
        procs: list[RouterProcess] = []
        try:
            check_workers(fleet.urls)  # a fleet that died mid-comparison fails fast
            if not rspec.client_side:
                procs = start_router(rspec, fleet, log_dir, replica_ports(base_port, i, len(routers), rspec))
            target = target_for(rspec.kind, fleet.urls, [p.url for p in procs] or None)
            time.sleep(settle_s)
            before = asyncio.run(_snapshot(fleet.urls))
            results, elapsed = asyncio.run(drive(records, target, concurrency, progress=progress))
            write_request_log(log_dir / f"requests-{_safe(name)}.jsonl", records, results)
            time.sleep(settle_s)  # let the last counters land in /metrics
            after = asyncio.run(_snapshot(fleet.urls))
            run = to_router_run(name, results, elapsed, before, after)
            if rspec.kind == "kvroute":
                states = [router_state(p.url) for p in procs]
                run.extra["router_state"] = states[0] if len(states) == 1 else states
        except Exception as exc:  # one broken router must not sink the comparison
            log.error("router %s failed: %s", name, exc)
            run = RouterRun(router=name, errors=len(records), extra={"failure": str(exc)[:500]})
        finally:
            for proc in procs:
                proc.stop()
        if len(procs) > 1:
            run.extra["replicas"] = len(procs)
        runs.append(run)
    return runs
