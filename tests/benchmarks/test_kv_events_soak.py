"""Exact-mode soak, a few seconds of it: events reach the index, it stays bounded and exact,
speculative entries expire, and the report files are written."""

from __future__ import annotations

import json
import time

from kvroute.benchmarks.kv_events_soak import Soak, SoakConfig, main, write_outputs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_short_soak_stays_bounded_and_exact(tmp_path) -> None:
    cfg = SoakConfig(workers=4, capacity_blocks=256, rate=80, lost_share=0.1, speculative_ttl_s=0.3, sample_s=0.5)
    soak = Soak(cfg)
    soak.run(3.0, progress=False)

    kinds = soak.counts.kinds
    assert kinds["BlockStored"] > 0 and kinds["BlockRemoved"] > 0  # caches filled, then evicted
    assert "invalid" not in kinds and "unresolved" not in kinds
    assert soak.requests > 100 and soak.completed > 0
    bound = cfg.workers * cfg.capacity_blocks
    for s in soak.samples:
        assert s["exact"] and s["map_mirrors_cache"], s  # the index equals what the workers published
        assert s["confirmed"] <= bound and s["hash_map"] <= bound and s["speculative"] <= bound
        assert s["holders"] <= s["confirmed"] + s["speculative"]
        assert s["index_entries"] == s["confirmed"] + s["speculative"] + s["hash_map"]
    assert soak.samples[-1]["confirmed"] > bound // 2
    assert any(s["speculative"] for s in soak.samples)

    # Speculative entries of finished requests expire after the TTL; those of requests still
    # in flight stay until they finish. Then the next dispatch to a worker purges them.
    ix = soak.index
    time.sleep(cfg.speculative_ttl_s + 0.05)
    in_flight = {(w.url, k) for w, ctx, _ in soak.flights.values() for k in ctx.block_keys}
    now = ix.clock()
    live = {(w, k) for w, spec in ix._speculative.items() for k, expiry in spec.items() if expiry > now}
    assert live <= in_flight
    for w, ctx, _ in soak.flights.values():
        soak.policy.on_complete(w, ctx, True)
    time.sleep(cfg.speculative_ttl_s + 0.05)
    for w in soak.workers:
        ix.insert(w.url, [])
    assert sum(map(len, ix._speculative.values())) == 0
    confirmed = [ix.confirmed_blocks(w.url) for w in soak.workers]
    assert len(ix) == sum(map(len, confirmed))
    assert set(ix._holders) == set().union(*confirmed)  # no key left behind without a holder

    summary = soak.summary(3.0)
    assert summary["always_exact"] and summary["events_per_s"] > 0
    write_outputs(tmp_path, cfg, summary, soak.samples, "cmd")
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["summary"]["requests"] == soak.requests and len(doc["samples"]) == len(soak.samples)
    assert (tmp_path / "memory.png").read_bytes().startswith(PNG_MAGIC)


def test_cli_writes_report(tmp_path) -> None:
    out = tmp_path / "soak"
    args = ["--seconds", "1", "--sample-s", "0.25", "--workers", "2", "--capacity-blocks", "128", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["workers"] == 2 and doc["config"]["capacity_blocks"] == 128
    assert doc["command"].startswith("python -m kvroute.benchmarks.kv_events_soak --seconds 1")
    assert {"rss_mb_warmup", "rss_mb_end", "rss_growth_mb", "events_per_s"} <= set(doc["summary"])
    md = (out / "results.md").read_text()
    assert doc["command"] in md and "| min | RSS MB |" in md
    assert (out / "memory.png").read_bytes().startswith(PNG_MAGIC)
