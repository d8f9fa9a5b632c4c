"""The governance overhead benchmark runs and writes its JSON and table (figures not checked)."""

from __future__ import annotations

import json

from kvroute.benchmarks import governance_bench


def test_governance_bench_writes_json_and_a_table(tmp_path, redis_url):
    assert governance_bench.main(["--requests", "30", "--redis-url", redis_url, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "governance_bench.json").read_text())
    assert [r["store"] for r in rows] == ["memory", "redis (loopback)"]
    assert all(r["admit_p50_ms"] > 0 for r in rows)
    assert "| memory |" in (tmp_path / "governance_bench.md").read_text()
