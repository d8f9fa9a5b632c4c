"""The governance overhead benchmark runs and writes its JSON and table (figures not checked)."""

from __future__ import annotations

import json

from kvroute.benchmarks import governance_bench


def test_governance_bench_writes_json_and_a_table(tmp_path, redis_url):
    assert governance_bench.main(["--requests", "30", "--redis-url", redis_url, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "governance_bench.json").read_text())
    assert [r["store"] for r in rows] == ["memory", "memory, all features", "redis (loopback)",
                                          "redis (loopback), all features"]
    assert all(r["admit_p50_ms"] > 0 for r in rows)
    assert "| memory |" in (tmp_path / "governance_bench.md").read_text()


def test_the_store_fault_mode_pauses_its_own_redis_and_writes_json_and_a_table(tmp_path):
    argv = ["--faults", "--requests", "20", "--concurrency", "2", "--pause-s", "0.6", "--out", str(tmp_path)]
    assert governance_bench.main(argv) == 0
    rows = json.loads((tmp_path / "governance_faults.json").read_text())
    assert [(r["budgets"], r["redis"]) for r in rows] == [
        ("fail_closed", "healthy"), ("fail_closed", "paused"), ("fail_open", "healthy"), ("fail_open", "paused")]
    assert rows[1]["refused_503"] == rows[1]["requests"] and rows[3]["admitted_unreserved"] == rows[3]["requests"]
    assert all(r["reservations_left"] == 0 for r in rows[1::2])
    assert "| fail_open | paused |" in (tmp_path / "governance_faults.md").read_text()
