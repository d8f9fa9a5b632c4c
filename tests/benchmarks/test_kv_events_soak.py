"""Exact-mode soak, a few seconds of it, checked against what the harness really did.

The test watches the soak from outside: it decodes and counts every KV-event batch the
simulated workers publish (and keeps its own copy of each worker's cache from them), and
counts the records the router takes from the workload. The summary and samples must agree
with those counts and with the workers' own counters; memory samples must come on
schedule; the index must stay bounded while far more blocks than it holds go through it,
and equal what the events describe; speculative entries must expire. Then the report files.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import msgspec

from kvroute.benchmarks.kv_events_soak import PublishingWorker, Soak, SoakConfig, main, write_outputs
from tests.clock import SkewedMonotonic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Watched:
    """What the soak did, counted apart from its own bookkeeping."""

    kinds: Counter[str] = field(default_factory=Counter)  # events by type, as published
    payloads: int = 0
    records: int = 0  # workload records routed
    stored_blocks: int = 0  # blocks in all BlockStored events
    held: dict[str, set[int]] = field(default_factory=dict)  # worker -> vLLM hashes its events say it holds


def watch(soak: Soak) -> Watched:
    seen = Watched(held={s.url: set() for s in soak.sims})
    publish, records = soak.publish, soak.records

    def counting_publish(i: int, batch) -> None:
        if batch is not None:
            _ts, events = msgspec.msgpack.decode(batch[0])
            seen.payloads += 1
            held = seen.held[soak.sims[i].url]
            for event in events:
                seen.kinds[event["type"]] += 1
                if event["type"] == "BlockStored":
                    seen.stored_blocks += len(event["block_hashes"])
                    held.update(event["block_hashes"])
                elif event["type"] == "BlockRemoved":
                    held.difference_update(event["block_hashes"])
        publish(i, batch)

    def counting_records():
        for rec in records:
            seen.records += 1
            yield rec

    soak.publish = counting_publish  # the soak publishes through self.publish
    soak.records = counting_records()
    return seen


def test_short_soak_reports_what_happened_and_stays_bounded_and_exact(tmp_path) -> None:
    duration = 3.0
    cfg = SoakConfig(workers=4, capacity_blocks=256, rate=80, lost_share=0.1, speculative_ttl_s=0.3, sample_s=0.5)
    clock = SkewedMonotonic()  # real time for the run; skipped ahead after it, for the TTLs
    soak = Soak(cfg, clock)
    seen = watch(soak)
    soak.run(duration, progress=False)
    summary, samples = soak.summary(duration), soak.samples

    # The counts in the summary are what was published and routed.
    assert seen.kinds["BlockStored"] > 0 and seen.kinds["BlockRemoved"] > 0  # caches filled, then evicted
    assert summary["events"] == dict(seen.kinds)  # also: nothing invalid or unresolved
    assert summary["payloads"] == seen.payloads
    assert summary["requests"] == seen.records and 100 < seen.records < 400  # ~80/s for 3 s
    assert summary["completed"] == sum(s.requests_done for s in soak.sims) > 0
    assert summary["completed"] + len(soak.flights) <= summary["requests"]  # lost ones never complete
    assert summary["events_per_s"] == round(sum(seen.kinds.values()) / samples[-1]["t_s"], 1)

    # Memory samples: one per --sample-s from t=0 to the end, each with real readings.
    assert duration / cfg.sample_s - 1 <= len(samples) <= duration / cfg.sample_s + 2  # a stall may merge two
    assert samples[0]["t_s"] < cfg.sample_s and samples[-1]["t_s"] >= duration
    for k, (prev, s) in enumerate(zip(samples, samples[1:]), start=1):
        assert s["t_s"] > prev["t_s"] and s["t_s"] >= k * cfg.sample_s - 0.05
        for key in ("cpu_s", "requests", "completed", "payloads", "events", "blocks_evicted"):
            assert s[key] >= prev[key], key
    assert all(s["rss_mb"] > 10 and s["gc_objects"] > 1000 for s in samples)
    assert samples[-1]["events"] == sum(seen.kinds.values()) and samples[-1]["requests"] == seen.records
    warm = next(s for s in samples if s["t_s"] >= duration / 3)
    assert (summary["warmup_s"], summary["rss_mb_warmup"]) == (warm["t_s"], warm["rss_mb"])
    assert summary["rss_mb_end"] == samples[-1]["rss_mb"]
    assert summary["rss_mb_max_last_half"] == max(s["rss_mb"] for s in samples if s["t_s"] >= duration / 2)

    # Bounded: more blocks went through the index than it may hold, yet it held at most that.
    bound = cfg.workers * cfg.capacity_blocks
    assert seen.stored_blocks > bound
    for s in samples:
        assert s["confirmed"] <= bound and s["hash_map"] <= bound and s["speculative"] <= bound, s
        assert s["holders"] <= s["confirmed"] + s["speculative"]
    assert summary["index_entries_max"] <= 3 * bound and summary["bound_confirmed"] == bound
    assert samples[-1]["confirmed"] > bound // 2  # and it was in use

    # Exact: the index holds, per worker, what the published events say the worker holds.
    ix = soak.index
    for w in soak.workers:
        confirmed = ix.confirmed_blocks(w.url)
        assert len(confirmed) <= cfg.capacity_blocks
        assert {PublishingWorker.vllm_hash(k) for k in confirmed} == seen.held[w.url], w.url
    assert all(s["exact"] and s["map_mirrors_cache"] for s in samples) and summary["always_exact"]
    assert any(s["speculative"] for s in samples)

    # Speculative entries of finished (or lost) requests expire after the TTL; those of
    # requests still in flight stay until they finish, and then expire too.
    clock.advance(cfg.speculative_ttl_s + 0.05)
    for w in soak.workers:
        confirmed = ix.confirmed_blocks(w.url)
        in_flight = {k for fw, ctx, _ in soak.flights.values() if fw is w for k in ctx.block_keys} - confirmed
        assert ix.blocks_of(w.url) - len(confirmed) <= len(in_flight), w.url
    for w, ctx, _ in soak.flights.values():
        soak.policy.on_complete(w, ctx, True)
    clock.advance(cfg.speculative_ttl_s + 0.05)
    for w in soak.workers:
        assert ix.blocks_of(w.url) == len(ix.confirmed_blocks(w.url)), w.url
    confirmed = [ix.confirmed_blocks(w.url) for w in soak.workers]
    after = soak.sample(duration, 0.0)
    assert after["speculative"] == 0 and after["confirmed"] == sum(map(len, confirmed))
    assert after["holders"] == len(set().union(*confirmed))  # no key left behind without a holder

    write_outputs(tmp_path, cfg, summary, samples, "cmd")
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc == {"command": "cmd", "config": asdict(cfg), "summary": summary, "samples": samples}
    md = (tmp_path / "results.md").read_text()
    assert f"| requests | {seen.records} |" in md and "| index always equal to the published caches | True |" in md
    assert (tmp_path / "memory.png").read_bytes().startswith(PNG_MAGIC)


def test_cli_writes_report(tmp_path) -> None:
    out = tmp_path / "soak"
    args = ["--seconds", "1", "--sample-s", "0.25", "--workers", "2", "--capacity-blocks", "128", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"] == asdict(SoakConfig(workers=2, capacity_blocks=128, sample_s=0.25))
    assert doc["command"] == "python -m kvroute.benchmarks.kv_events_soak " + " ".join(args)
    summary, samples = doc["summary"], doc["samples"]
    assert 4 <= len(samples) <= 6 and samples[-1]["t_s"] >= 1.0 and summary["duration_s"] == samples[-1]["t_s"]
    assert summary["requests"] == samples[-1]["requests"] > 0 and summary["always_exact"]
    assert summary["rss_mb_end"] == samples[-1]["rss_mb"] > 0
    assert sum(summary["events"].values()) == samples[-1]["events"] > 0
    assert max(s["confirmed"] for s in samples) <= summary["bound_confirmed"] == 2 * 128
    md = (out / "results.md").read_text()
    assert doc["command"] in md and "| min | RSS MB |" in md
    assert (out / "memory.png").read_bytes().startswith(PNG_MAGIC)
