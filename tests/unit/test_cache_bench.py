"""``kvroute bench cache`` end to end on a small workload (real router, upstream and Redis)."""

from __future__ import annotations

import json

from kvroute.benchmarks.cli import main


def test_bench_cache_writes_its_results(tmp_path, redis_url):
    out = tmp_path / "cache"
    assert main(["cache", "--requests", "120", "--distinct", "20", "--redis-url", redis_url, "--out", str(out)]) == 0
    results = json.loads((out / "cache.json").read_text())["results"]
    for store in ("memory", "redis"):
        r = results[store]
        assert r["requests"] == 120 and r["false_hits"] == 0
        assert 0.5 < r["hit_rate"] < 1 and r["saved_tokens"] == r["hits"] * 240
        assert r["hit_p50_ms"] > 0 and r["miss_p50_ms"] > 0
    assert results["memory"]["hit_rate"] == results["redis"]["hit_rate"]  # the same workload, a fresh cache each
    assert "| memory |" in (out / "cache.md").read_text() and (out / "cache.png").stat().st_size > 0
