"""CLI subcommands (sim run, trace) and the pieces of the real-fleet and overhead runs."""

from __future__ import annotations

import json
import sys

import orjson
import pytest

from kvroute.benchmarks.cli import main
from kvroute.benchmarks.fleets.routers import parse_router, router_command
from kvroute.benchmarks.overhead import _add_overhead, fake_upstream_app, render_overhead
from kvroute.benchmarks.runner import drive, write_request_log
from kvroute.benchmarks.workloads import WorkloadSpec, iter_records, read_trace


def test_sim_run_writes_report(tmp_path, capsys) -> None:
    out = tmp_path / "sim"
    rc = main(
        [
            "--fleet",
            "sim",
            "--workers",
            "2,4",
            "--workload",
            "hot-prefix",
            "--requests",
            "60",
            "--groups",
            "4",
            "--prefix-tokens",
            "300",
            "--kv-blocks",
            "64",
            "--policies",
            "round_robin,prefix,prefix?kv_events=1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["routers"]) == ["round_robin", "prefix", "prefix?kv_events=1", "oracle"]
    assert doc["routers"]["prefix?kv_events=1"]["index_mismatch_blocks"] == 0  # exact mode ran
    assert doc["fleet"]["workers"] == 4 and len(doc["sweep"]) == 2
    assert doc["command"].startswith("kvroute bench --fleet sim")
    assert "| prefix |" in capsys.readouterr().out


def test_trace_subcommand(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    assert main(["trace", "--workload", "agent", "--requests", "12", "--out", str(path)]) == 0
    assert len(list(read_trace(path))) == 12


def test_bad_workload_is_an_argparse_error() -> None:
    with pytest.raises(SystemExit):
        main(["--workload", "nope"])


def test_router_specs() -> None:
    assert parse_router("prefix").kind == "kvroute"
    assert parse_router("smg:cache_aware").policy == "cache_aware"
    assert parse_router("oracle").client_side
    with pytest.raises(ValueError):
        parse_router("nginx:rr")
    cmd = router_command(parse_router("prefix"), 8250, ["http://a", "http://b"], "tiny", "/tok", 32)
    assert cmd[:3] == [sys.executable, "-m", "kvroute.router.cli"] and cmd.count("--worker") == 2
    assert "--tokenizer" in cmd and "serve" in cmd


def test_router_options_go_through_a_config_file(tmp_path) -> None:
    spec = parse_router("prefix?load_weight=0.25&kv_capacity_blocks=320")
    assert spec.policy == "prefix" and spec.policy_options == {"load_weight": 0.25}
    assert spec.model_options == {"kv_capacity_blocks": 320}
    cmd = router_command(spec, 8251, ["http://a"], "tiny", str(tmp_path), 32, tmp_path)
    assert cmd[-2:] == ["--config", str(tmp_path / "kvroute-8251.yaml")]
    from kvroute.router.config import load_config

    model = load_config(tmp_path / "kvroute-8251.yaml").models[0]
    assert model.policy_options == {"load_weight": 0.25} and model.kv_capacity_blocks == 320
    with pytest.raises(ValueError):
        parse_router("smg:cache_aware?x=1")
    with pytest.raises(ValueError):
        parse_router("prefix?load_weight=heavy")


async def test_drive_against_fake_upstream(aiohttp_server, tmp_path) -> None:
    server = await aiohttp_server(fake_upstream_app())
    recs = list(iter_records(WorkloadSpec(requests=10, groups=2, prefix_tokens=50)))
    results, elapsed = await drive(
        recs, lambda r: str(server.make_url("")).rstrip("/"), concurrency=3
    )
    assert len(results) == 10 and all(r.ok and r.ttft_s is not None for r in results)
    assert elapsed > 0
    assert all(r.prompt_tokens == 1 and r.cached_tokens == 0 for r in results)  # the usage chunk
    write_request_log(tmp_path / "requests.jsonl", recs, results)
    lines = [orjson.loads(line) for line in (tmp_path / "requests.jsonl").read_bytes().splitlines()]
    assert [line["group"] for line in lines] == [r.group for r in recs]
    assert lines[0]["ok"] and lines[0]["cached_tokens"] == 0


def test_overhead_table() -> None:
    results = {
        "direct": {"plain": {"p50_ms": 1.0, "p99_ms": 2.0, "rps": 900.0, "errors": 0}},
        "prefix": {"plain": {"p50_ms": 1.5, "p99_ms": 4.0, "rps": 600.0, "errors": 0}},
        "smg:cache_aware": {"failure": "boom"},
    }
    _add_overhead(results)
    assert results["prefix"]["plain"]["added_p50_ms"] == 0.5
    md = render_overhead(
        {"requests": 1, "concurrency": 1, "prompt_tokens": 1, "command": "c", "routers": results}
    )
    assert "| prefix | plain | 1.5 | 4.0 | 0.5 | 2.0 | 600.0 | 0 |" in md and "failed: boom" in md
