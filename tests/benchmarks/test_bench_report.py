"""Report writer: results.json keys, markdown table, plots; summary arithmetic."""

from __future__ import annotations

import json

from kvroute.benchmarks.report import write_report
from kvroute.benchmarks.results import RouterRun, max_share_over_fair, percentile

REQUIRED = {
    "hit_rate",
    "hit_rate_vs_oracle",
    "max_share_over_fair",
    "ttft_p50_s",
    "ttft_p99_s",
    "throughput_rps",
    "errors",
    "workload",
    "fleet",
    "seed",
}


def _run(name: str, hits: float, per_worker: list[float]) -> RouterRun:
    return RouterRun(
        router=name,
        queries=1000,
        hits=hits,
        per_worker_requests=per_worker,
        ttft_s=[0.01 * i for i in range(1, 101)],
        latency_s=[0.5] * 100,
        completed=100,
        duration_s=10.0,
    )


def test_percentile_and_share() -> None:
    assert percentile([], 50) is None
    assert percentile(list(range(1, 101)), 50) == 50
    assert percentile(list(range(1, 101)), 99) == 99
    assert max_share_over_fair([10, 10, 20]) == 1.5
    assert max_share_over_fair([0, 0]) is None


def test_write_report(tmp_path) -> None:
    runs = [
        _run("round_robin", 300, [25, 25, 25, 25]),
        _run("prefix", 800, [40, 20, 20, 20]),
        _run("oracle", 880, [25, 25, 25, 25]),
    ]
    header = {
        "command": "kvroute bench x",
        "workload": {"name": "shared-prefix"},
        "fleet": {"kind": "sim", "workers": 4},
        "seed": 7,
    }
    sweep = [(2, runs), (4, runs)]
    doc = write_report(tmp_path, header, runs, sweep)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["routers"].keys() == {"round_robin", "prefix", "oracle"}
    for entry in on_disk["routers"].values():
        assert REQUIRED <= entry.keys()
    p = on_disk["routers"]["prefix"]
    assert p["hit_rate"] == 0.8 and p["hit_rate_vs_oracle"] == round(0.8 / 0.88, 4)
    assert p["max_share_over_fair"] == 1.6 and p["throughput_rps"] == 10.0 and p["seed"] == 7
    assert [s["workers"] for s in on_disk["sweep"]] == [2, 4]
    assert doc["routers"]["oracle"]["hit_rate_vs_oracle"] == 1.0
    md = (tmp_path / "results.md").read_text()
    assert "| prefix | 0.800 | 0.91 |" in md and "kvroute bench x" in md
    for png in ("hit_rate.png", "ttft_cdf.png", "worker_load.png", "scaling.png"):
        assert (tmp_path / png).stat().st_size > 1000
