"""``kvroute bench hot-sweep``: a small sweep on the simulator, its report and its labels."""

from __future__ import annotations

import json

from kvroute.benchmarks.cli import build_parser, command_argv, main
from kvroute.benchmarks.hot_sweep import parse_routers, run


def test_hot_sweep_writes_json_markdown_and_plot(tmp_path) -> None:
    out = tmp_path / "sweep"
    rc = main(["hot-sweep", "--policies", "before=prefix?hot_load=0,prefix", "--shares", "0.2,0.6",
               "--seeds", "0,1", "--workers", "2", "--requests", "40", "--groups", "4",
               "--prefix-tokens", "200", "--kv-blocks", "64", "--tokenization", "words", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["command"].startswith("kvroute bench hot-sweep --policies")
    assert doc["routers"] == ["before", "prefix", "oracle"]
    assert [p["share"] for p in doc["points"]] == [0.2, 0.6]
    for point in doc["points"]:
        before, oracle = point["routers"]["before"], point["routers"]["oracle"]
        assert before["router"] == "prefix?hot_load=0" and len(before["runs"]) == 2
        assert all(sum(r["per_worker_requests"]) == 40 for r in before["runs"])
        assert 0 < before["hit_rate"] <= 1 and before["max_share_over_fair"] >= 1
        assert before["max_share_over_fair_worst"] >= before["max_share_over_fair"]
        # the mean of the per-seed gaps is the gap of the means (up to rounding)
        assert abs(before["gap_to_oracle_points"] - 100 * (oracle["hit_rate"] - before["hit_rate"])) < 0.02
    md = (out / "results.md").read_text()
    assert "| 0.20 |" in md and "| 0.60 |" in md and "before: busiest / fair" in md
    assert (out / "hot_sweep.png").stat().st_size > 1000


def test_the_same_seed_gives_the_same_sweep(tmp_path) -> None:
    flags = ["--policies", "prefix", "--shares", "0.4", "--seeds", "3", "--workers", "2", "--requests", "30",
             "--groups", "3", "--prefix-tokens", "160", "--kv-blocks", "64", "--tokenization", "words",
             "--no-oracle"]
    docs = []
    for d in "ab":
        args = build_parser().parse_args(command_argv(["hot-sweep", *flags, "--out", str(tmp_path / d)]))
        assert args.handler is run
        run(args, [])
        docs.append(json.loads((tmp_path / d / "results.json").read_text())["points"])
    assert docs[0] == docs[1]


def test_router_labels() -> None:
    assert parse_routers("before=prefix?hot_load=0, prefix?hot_load=1.5", oracle=True) == [
        ("before", "prefix?hot_load=0"), ("prefix?hot_load=1.5", "prefix?hot_load=1.5"), ("oracle", "oracle")]
    assert parse_routers("prefix", oracle=False) == [("prefix", "prefix")]
