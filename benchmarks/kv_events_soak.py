"""Soak: does exact mode's memory stay flat while a fleet's KV caches churn? (issue 4)

Simulated vLLM workers (``SimWorker``: block LRU, continuous batching) run in real time
and publish KV events as vLLM publishes them: msgpack ``[ts, [events]]`` batches, one
per engine step, with ``BlockStored`` (token ids, parent hash) when blocks are cached and
one ``BlockRemoved`` per evicted block. The batches go through ``WorkerEvents.
apply_payload`` into one ``ExactIndex`` while the real ``prefix`` policy routes every
request (``index.match``) and records speculative entries (``index.insert``), as the
router does. The workload never repeats: shared-prefix and multi-turn groups get a fresh
nonce every epoch, so the set of blocks seen grows without bound and anything kept per
block and never freed shows up as growth.

Every ``--sample-s`` it records RSS, the index's entries (confirmed, speculative, key ->
holders, vLLM hash -> key maps) and their approximate bytes, and checks that the index
equals the workers' caches. Writes results.json, results.md and memory.png to ``--out``.

    nice -n 10 python -m kvroute.benchmarks.kv_events_soak --minutes 30 --out bench-out/kv-soak
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import random
import resource
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import msgspec
import xxhash

from kvroute.benchmarks.backends.simkeys import WordIds
from kvroute.benchmarks.backends.simworker import SimRequest, SimWorker, Timing
from kvroute.benchmarks.workloads import TraceRecord, WorkloadSpec, iter_records
from kvroute.router.kv_events import WorkerEvents
from kvroute.router.kv_index import EventCounter, ExactIndex
from kvroute.router.policies.base import PolicyDeps, RequestContext
from kvroute.router.policies.registry import create_policy
from kvroute.router.prefix import chain_keys
from kvroute.router.upstream.workers import Worker


class BlockStored(msgspec.Struct, tag=True):  # the wire shapes of vllm.distributed.kv_events
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = "GPU"


class BlockRemoved(msgspec.Struct, tag=True):
    block_hashes: list[int]
    medium: str | None = "GPU"


@dataclass(frozen=True)
class SoakConfig:
    workers: int = 8
    capacity_blocks: int = 1024  # per worker (vLLM's num_gpu_blocks); also the index's safety cap
    block_size: int = 16  # vLLM's GPU default
    rate: float = 100.0  # requests per second, Poisson
    lost_share: float = 0.02  # dispatches that fail before vLLM schedules them: speculative only
    speculative_ttl_s: float = 5.0
    sample_s: float = 30.0
    tick_s: float = 0.05  # each loop turn does what is due, then sleeps the rest: moderate CPU
    # When the shared host stalls the loop, arrivals older than this are skipped (and counted): a burst of
    # them would set the RSS high-water mark with the simulator's in-flight requests, not the index.
    max_backlog_s: float = 1.0
    seed: int = 0


class PublishingWorker(SimWorker):
    """A SimWorker that queues vLLM KV events. Blocks are cached at admission; a request's
    token ids travel in ``SimRequest.payload``. vLLM names blocks by its own hash, so a
    seeded hash of our key stands in for it: the index must map it back, as in production."""

    def __init__(self, url: str, capacity_blocks: int, block_size: int):
        super().__init__(url, capacity_blocks, block_size, Timing(), listener=self._on_event)
        self.queue: list[BlockStored | BlockRemoved] = []
        self.changes: list[tuple[bool, int]] = []  # (stored?, key) of the queued events
        self.encoder = msgspec.msgpack.Encoder()

    @staticmethod
    def vllm_hash(key: int) -> int:
        return xxhash.xxh3_64_intdigest(key.to_bytes(8, "little"), seed=0x5EED)

    def _on_event(self, url: str, kind: str, keys: list[int]) -> None:
        if kind == "removed":  # stores are published at admission, below
            for key in keys:
                self.queue.append(BlockRemoved([self.vllm_hash(key)]))
                self.changes.append((False, key))

    def _try_allocate(self, req: SimRequest) -> bool:
        new = [k not in self.refs and k not in self.free for k in req.keys]
        if not super()._try_allocate(req):  # evictions, if any, are queued first, as in vLLM
            return False
        bs, i = self.block_size, 0
        while i < len(new):  # one BlockStored per run of newly cached blocks
            if not new[i]:
                i += 1
                continue
            j = next((j for j in range(i, len(new)) if not new[j]), len(new))
            parent = self.vllm_hash(req.keys[i - 1]) if i else None
            hashes = [self.vllm_hash(k) for k in req.keys[i:j]]
            self.queue.append(BlockStored(hashes, parent, req.payload[i * bs : j * bs], bs))
            self.changes += [(True, k) for k in req.keys[i:j]]
            i = j
        return True

    def published_keys(self, pending: list[tuple[bool, int]]) -> set[int]:
        """The cache as the events published so far describe it: now, less ``pending``."""
        keys = set(self.refs) | set(self.free)
        for stored, key in reversed(pending):
            (keys.discard if stored else keys.add)(key)
        return keys

    def flush(self) -> tuple[bytes, list[tuple[bool, int]]] | None:
        """This step's events as one batch to publish, with what they change."""
        if not self.queue:
            return None
        batch = self.encoder.encode([time.time(), self.queue]), self.changes  # vLLM's EventBatch
        self.queue, self.changes = [], []
        return batch


class _Counts(EventCounter):
    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()

    def event(self, worker: str, kind: str, n: int = 1) -> None:
        self.kinds[kind] += n


def endless_workload(seed: int) -> Iterator[TraceRecord]:
    """Shared-prefix and multi-turn traffic, mixed; every epoch of each has fresh prefixes."""
    def epochs(name: str, **kw: Any) -> Iterator[TraceRecord]:
        for epoch in itertools.count():
            yield from iter_records(WorkloadSpec(name, seed, f"soak-{epoch}", requests=256, **kw))

    rng = random.Random(seed)
    streams = [epochs("shared-prefix", groups=8, prefix_tokens=1500), epochs("multi-turn", groups=16)]
    while True:
        yield next(rng.choice(streams))


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak, where /proc is missing


class Soak:
    """The fleet, the router's index and policy, and the loop that drives them in real time.

    ``clock`` is the index's (its TTLs): monotonic real time, which the loop also runs on;
    a test may pass one that it can move ahead to expire entries without waiting.
    """

    def __init__(self, cfg: SoakConfig, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.index = ExactIndex(cfg.capacity_blocks, cfg.speculative_ttl_s, clock)
        self.counts = _Counts()
        self.sims = [PublishingWorker(f"http://sim-{i}:8000", cfg.capacity_blocks, cfg.block_size)
                     for i in range(cfg.workers)]
        self.subs = [WorkerEvents(s.url, self.index, self.counts) for s in self.sims]
        self.workers = [Worker(url=s.url, model="tiny", block_size=cfg.block_size) for s in self.sims]
        self.by_url = {w.url: i for i, w in enumerate(self.workers)}
        self.policy = create_policy("prefix", PolicyDeps(index=self.index, rng=random.Random(cfg.seed)), None)
        self.policy.on_workers_changed(self.workers)
        # Every fresh prefix brings a new tag word; the stand-in tokenizer's default cache
        # (200k words, ~30 MB) would grow through the whole run and hide the index's memory.
        self.tok = WordIds(cache_size=4096)
        self.records = endless_workload(cfg.seed)
        self.flights: dict[int, tuple[Worker, RequestContext, int]] = {}
        # worker -> (end, chunks, events) of its step in progress; vLLM publishes after the step
        self.steps: dict[int, tuple[float, list, Any]] = {}
        self.rng = random.Random(cfg.seed)
        self.rids = itertools.count()
        self.requests = self.completed = self.payloads = 0
        self.max_gap = 0.0  # longest wait between loop turns since the last sample
        self.skipped_s = 0.0  # seconds of arrivals skipped after stalls
        self.samples: list[dict] = []

    def route(self, at: float) -> None:
        """What the router does per request: match, choose, insert speculatively, dispatch."""
        rec = next(self.records)
        tokens = [t for m in rec.body["messages"] for t in self.tok.message_ids(m["role"], m["content"])]
        tokens += self.tok.generation_ids()
        max_tokens = int(rec.body["max_tokens"])
        ctx = RequestContext("tiny", tuple(chain_keys(tokens, self.cfg.block_size)), self.cfg.block_size,
                             len(tokens), max_tokens, rec.session)
        w = self.policy.select(self.workers, ctx) or self.workers[0]
        load = max(0, len(tokens) - self.policy.predicted_cached_tokens(w, ctx)) + max_tokens
        self.policy.on_dispatch(w, ctx)  # index.insert: speculative until vLLM's events confirm
        self.requests += 1
        if self.rng.random() < self.cfg.lost_share:  # e.g. the client went away: never cached
            self.policy.on_complete(w, ctx, False)
            return
        w.in_flight_requests += 1
        w.in_flight_tokens += load
        rid = next(self.rids)
        self.flights[rid] = (w, ctx, load)
        self.sims[self.by_url[w.url]].submit(SimRequest(rid, ctx.block_keys, len(tokens), max_tokens, at, tokens))

    def advance(self, now: float) -> None:
        """Run each worker's engine steps up to ``now``, publishing each step's events."""
        for i, sim in enumerate(self.sims):
            t = now
            while True:
                step = self.steps.pop(i, None)
                if step is not None:
                    if step[0] > now:
                        self.steps[i] = step
                        break
                    t = step[0]
                    self.publish(i, step[2])
                    for r in sim.finish_step(t, step[1])[0]:
                        w, ctx, load = self.flights.pop(r.rid)
                        w.in_flight_requests -= 1
                        w.in_flight_tokens -= load
                        self.policy.on_complete(w, ctx, True)
                        self.completed += 1
                plan = sim.plan_step()  # admits requests: their new blocks are cached now
                if plan is None:
                    self.publish(i, sim.flush())
                    break
                self.steps[i] = (t + plan[0], plan[1], sim.flush())

    def unpublished(self, i: int) -> list[tuple[bool, int]]:
        batch = self.steps[i][2] if i in self.steps else None
        return batch[1] if batch else []

    def publish(self, i: int, batch: tuple[bytes, list] | None) -> None:
        if batch is not None:
            self.subs[i].apply_payload(batch[0])  # what the router's subscriber does per batch
            self.payloads += 1

    def scrape(self) -> None:
        for w, s in zip(self.workers, self.sims):
            w.vllm_running, w.vllm_waiting, w.kv_usage = s.num_running, s.num_waiting, s.kv_usage()

    def sample(self, t: float, cpu_s: float) -> dict:
        ix, clock = self.index, self.index.clock()
        confirmed = {s.url: ix.confirmed_blocks(s.url) for s in self.sims}
        spec = [e for od in ix._speculative.values() for e in od.values()]  # reading internals: measuring
        maps = [len(e._ours) for e in self.subs]
        nbytes = sys.getsizeof(ix._holders) + sum(sys.getsizeof(k) + sys.getsizeof(h) for k, h in ix._holders.items())
        nbytes += sum(sys.getsizeof(od) + 48 * len(od) for od in (*ix._confirmed.values(), *ix._speculative.values()))
        nbytes += sum(sys.getsizeof(e._ours) + sum(map(sys.getsizeof, itertools.chain(*e._ours.items())))
                      for e in self.subs)
        return {
            "t_s": round(t, 1), "rss_mb": round(rss_mb(), 2), "gc_objects": len(gc.get_objects()),
            "cpu_s": round(cpu_s, 2), "requests": self.requests, "completed": self.completed,
            "in_flight": len(self.flights), "waiting": sum(s.num_waiting for s in self.sims),
            "payloads": self.payloads, "events": sum(self.counts.kinds.values()),
            "confirmed": sum(map(len, confirmed.values())), "speculative": len(spec),
            "speculative_live": sum(1 for e in spec if e > clock), "holders": len(ix._holders),
            "hash_map": sum(maps), "index_entries": len(ix) + sum(maps), "index_bytes": nbytes,
            "exact": all(confirmed[s.url] == s.published_keys(self.unpublished(i)) for i, s in enumerate(self.sims)),
            "map_mirrors_cache": all(n == len(confirmed[s.url]) for n, s in zip(maps, self.sims)),
            "blocks_evicted": sum(s.evictions for s in self.sims), "max_loop_gap_s": round(self.max_gap, 3),
            "arrivals_skipped_s": round(self.skipped_s, 2),
        }

    def run(self, duration_s: float, progress: bool = True) -> None:
        from tqdm import tqdm

        rng = random.Random(self.cfg.seed)
        bar = tqdm(total=round(duration_s), unit="s", desc="kv soak", mininterval=5, disable=not progress,
                   file=sys.stderr)
        start, cpu0 = time.monotonic(), time.process_time()
        next_arrival = next_sample = next_scrape = prev = 0.0
        while True:
            now = time.monotonic() - start
            self.max_gap, prev = max(self.max_gap, now - prev), now
            if now >= next_sample or now >= duration_s:
                self.samples.append(self.sample(now, time.process_time() - cpu0))
                self.max_gap = 0.0
                last = self.samples[-1]
                bar.set_postfix(rss=f"{last['rss_mb']:.0f}MB", entries=last["index_entries"],
                                ev=last["events"], refresh=False)
                next_sample += self.cfg.sample_s
                if now >= duration_s:
                    break
            if now - next_arrival > self.cfg.max_backlog_s:
                self.skipped_s += now - self.cfg.max_backlog_s - next_arrival
                next_arrival = now - self.cfg.max_backlog_s
            while next_arrival <= now:
                self.route(next_arrival)
                next_arrival += rng.expovariate(self.cfg.rate)
            self.advance(now)
            if now >= next_scrape:
                self.scrape()
                next_scrape += 1.0
            bar.update(min(int(now), bar.total) - bar.n)
            time.sleep(max(0.0, self.cfg.tick_s - (time.monotonic() - start - now)))
        bar.close()

    def summary(self, duration_s: float) -> dict:
        s = self.samples
        warm_s = min(300.0, duration_s / 3)  # the 5-minute mark; a third of a short run
        warm = next(x for x in s if x["t_s"] >= warm_s)
        last, late = s[-1], [x for x in s if x["t_s"] >= duration_s / 2]
        slope = (statistics.linear_regression([x["t_s"] for x in late], [x["rss_mb"] for x in late]).slope
                 if len(late) > 1 else 0.0)
        kinds = dict(self.counts.kinds)
        return {
            "duration_s": round(last["t_s"], 1), "requests": self.requests, "completed": self.completed,
            "events": kinds, "events_per_s": round(sum(kinds.values()) / last["t_s"], 1),
            "requests_per_s": round(self.requests / last["t_s"], 2), "payloads": self.payloads,
            "cpu_share": round(last["cpu_s"] / last["t_s"], 3), "warmup_s": warm["t_s"],
            "rss_mb_warmup": warm["rss_mb"], "rss_mb_end": last["rss_mb"],
            "rss_mb_max_last_half": max(x["rss_mb"] for x in late),
            "rss_growth_mb": round(last["rss_mb"] - warm["rss_mb"], 2),
            "rss_growth_pct": round(100 * (last["rss_mb"] - warm["rss_mb"]) / warm["rss_mb"], 2),
            "rss_slope_mb_per_h_last_half": round(slope * 3600, 2),
            "index_entries": {k: x["index_entries"] for k, x in (("first", s[min(1, len(s) - 1)]), ("warmup", warm),
                                                                 ("end", last))},
            "index_entries_max": max(x["index_entries"] for x in s),
            "index_bytes": {"warmup": warm["index_bytes"], "end": last["index_bytes"]},
            "gc_objects": {"warmup": warm["gc_objects"], "end": last["gc_objects"]},
            "max_loop_gap_s": max(x["max_loop_gap_s"] for x in s), "arrivals_skipped_s": last["arrivals_skipped_s"],
            "bound_confirmed": self.cfg.workers * self.cfg.capacity_blocks,
            "always_exact": all(x["exact"] and x["map_mirrors_cache"] for x in s),
        }


def write_outputs(out: Path, cfg: SoakConfig, summary: dict, samples: list[dict], command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    doc = {"command": command, "config": asdict(cfg), "summary": summary, "samples": samples}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    step = max(1, len(samples) // 10)
    rows = "".join(f"| {x['t_s'] / 60:.1f} | {x['rss_mb']:.1f} | {x['index_entries']} | {x['confirmed']} | "
                   f"{x['speculative']} | {x['hash_map']} | {x['events']} | {x['requests']} | {x['max_loop_gap_s']} |\n"
                   for x in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []))
    su, e = summary, summary["index_entries"]
    facts = [
        ("duration", f"{su['duration_s'] / 60:.1f} min"), ("requests", su["requests"]),
        ("events applied", f"{sum(su['events'].values())} ({su['events_per_s']}/s): {su['events']}"),
        ("CPU", f"{100 * su['cpu_share']:.0f}% of a core"),
        (f"RSS at {su['warmup_s'] / 60:.1f} min / end", f"{su['rss_mb_warmup']} / {su['rss_mb_end']} MB"),
        ("RSS growth", f"{su['rss_growth_mb']} MB ({su['rss_growth_pct']}%), max in the last half "
                       f"{su['rss_mb_max_last_half']} MB, trend {su['rss_slope_mb_per_h_last_half']} MB/h"),
        ("index entries first / warmup / end / max", f"{e['first']} / {e['warmup']} / {e['end']} / "
                                                     f"{su['index_entries_max']}"),
        ("index bytes warmup / end", f"{su['index_bytes']['warmup']} / {su['index_bytes']['end']}"),
        ("index always equal to the published caches", su["always_exact"]),
        ("longest loop stall (host busy)", f"{su['max_loop_gap_s']} s; arrivals skipped after stalls: "
                                           f"{su['arrivals_skipped_s']} s worth"),
    ]
    (out / "results.md").write_text(
        f"# Exact mode soak\n\n`{command}`\n\n| | |\n|---|---|\n"
        + "".join(f"| {k} | {v} |\n" for k, v in facts)
        + "\n| min | RSS MB | index entries | confirmed | speculative | vLLM hash map | events | requests | "
        "longest loop stall s |\n|---|---|---|---|---|---|---|---|---|\n" + rows)
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    minutes = [x["t_s"] / 60 for x in samples]
    ax1.plot(minutes, [x["rss_mb"] for x in samples])
    ax1.set_ylabel("RSS (MB)")
    ax1.set_ylim(bottom=0)
    for key in ("confirmed", "speculative", "holders", "hash_map"):
        ax2.plot(minutes, [x[key] for x in samples], label=key)
    ax2.set_ylabel("index entries")
    ax2.set_xlabel("minutes")
    ax2.legend(loc="lower right")
    fig.suptitle("kvroute exact mode: memory under endless fresh prefixes")
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kv_events_soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--seconds", type=float, help="duration in seconds (overrides --minutes)")
    p.add_argument("--out", default="bench-out/kv-soak")
    knobs = [f.name for f in fields(SoakConfig)]
    for name in knobs:
        default = getattr(SoakConfig, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = SoakConfig(**{name: getattr(args, name) for name in knobs})
    duration = args.seconds if args.seconds is not None else 60 * args.minutes
    soak = Soak(cfg)
    soak.run(duration, progress=not args.no_progress)
    summary = soak.summary(duration)
    args_used = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "kvroute.benchmarks.kv_events_soak", *args_used])
    write_outputs(Path(args.out), cfg, summary, soak.samples, command)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
