"""``kvroute bench reliability``: the load and rolling-restart parts end to end with tiny numbers
(a real ``kvroute serve`` subprocess in front of mock workers in another), and the pieces of
the fault part that need no real fleet: the fault proxy, the summary of one fault, the metric
reader."""

from __future__ import annotations

import json

import aiohttp
import pytest

from kvroute.benchmarks import reliability
from kvroute.benchmarks.backends.mock import fake_worker
from kvroute.benchmarks.cli import build_parser, command_argv, main
from kvroute.benchmarks.reliability import FaultProxy, Poll, StreamResult, metric_value, summarize_fault


def test_load_and_restart_parts_write_json_markdown_and_plots(tmp_path) -> None:
    out = tmp_path / "rel"
    argv = ["reliability", "--streams", "20", "--rounds", "1", "--stream-s", "0.5", "--ramp-s", "0.2",
            "--no-tokenizer", "--restart-streams", "6", "--restart-stream-s", "1.5", "--drain-s", "10",
            "--cut-drain-s", "0.3", "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads((out / "reliability.json").read_text())
    assert doc["command"] == "kvroute bench " + " ".join(argv)
    assert doc["targets_met"] and "faults" not in doc

    load = doc["load"]
    (rnd,) = load["rounds"]
    assert (load["streams"], load["errors"], load["incomplete"]) == (20, 0, 0)
    assert rnd["outcomes"]["ok"] == 20 and rnd["direct_outcomes"]["ok"] == 20
    assert rnd["peak_open_streams"] > 1  # they overlapped
    assert rnd["rss_end_mb"] > 0 and rnd["added_p50_ms"] is not None

    within, past = doc["restart"]["cases"]
    assert within["case"] == "within drain_s" and past["case"] == "past drain_s"
    # drain_s longer than the streams: SIGTERM cuts nothing, and the router exits 0 once they end
    assert (within["open_at_sigterm"], within["completed"], within["cut"], within["hangs"]) == (6, 6, 0, 0)
    assert within["router_exit_code"] == 0 and within["exit_after_sigterm_s"] < 10
    assert (within["new_request_status"], within["new_request_code"], within["readyz_status"]) == (
        503, "shutting_down", 503)
    # drain_s shorter: every stream still open ends with a clean SSE error, nobody hangs
    assert past["outcomes"]["cut_clean"] == 6 and past["cut_codes"] == ["shutting_down"] and past["hangs"] == 0

    md = (out / "reliability.md").read_text()
    assert "## Load: 20 concurrent streams" in md and "| within drain_s | 6 (1.5) | 10 |" in md
    assert md.rstrip().endswith("All targets: met.")
    assert doc["plots"] == ["load.png", "restart.png"]
    assert all((out / name).stat().st_size > 1000 for name in doc["plots"])


def test_faults_need_a_local_fleet_and_known_names() -> None:
    parse = lambda line: build_parser().parse_args(command_argv(line.split()))  # noqa: E731
    with pytest.raises(SystemExit, match="needs --fleet local"):
        reliability.run(parse("reliability --parts faults"), [])
    with pytest.raises(SystemExit, match="--parts: unknown"):
        reliability.run(parse("reliability --parts nope"), [])
    assert reliability._parts(parse("reliability --fleet local")) == ["load", "restart", "faults"]
    assert reliability._parts(parse("reliability --parts faults --fleet local")) == ["faults"]


# The invocations docs/reliability.md shows, with the flags they must set.
DOCUMENTED = [
    ("reliability --streams 1000 --rounds 3 --restart-streams 200 --out DIR",
     {"streams": 1000, "rounds": 3, "restart_streams": 200, "drain_s": 30.0, "stream_s": 8.0, "out": "DIR"}),
    ("reliability --parts faults --fleet local --out DIR",
     {"parts": "faults", "fleet": "local", "first_byte_s": 3.0, "cooldown_s": 5.0, "idle_s": 5.0,
      "faults": "kill,stop,503,redis-fail_closed,redis-fail_open", "fault_rate": 5.0}),
    ("reliability --parts faults --fleet local --faults stop,503,redis-fail_closed,redis-fail_open --out DIR",
     {"faults": "stop,503,redis-fail_closed,redis-fail_open", "kv_blocks": 128, "max_tokens": 32, "stop_s": 20.0,
      "unavailable_s": 30.0, "redis_pause_s": 10.0, "baseline_s": 10.0, "client_timeout_s": 60.0}),
    ("reliability --parts faults --fleet local --faults kill --out DIR", {"faults": "kill", "down_s": 15.0}),
]


@pytest.mark.parametrize(("line", "expected"), DOCUMENTED, ids=[d[0][:40] for d in DOCUMENTED])
def test_documented_invocations(line, expected) -> None:
    args = build_parser().parse_args(command_argv(line.split()))
    assert args.handler is reliability.run
    assert {k: getattr(args, k) for k in expected} == expected


async def test_the_fault_proxy_passes_through_and_answers_503_while_failing(aiohttp_server) -> None:
    worker = await aiohttp_server(fake_worker("w"))
    proxy = FaultProxy(str(worker.make_url("")).rstrip("/"))
    await proxy.start()
    body = {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(proxy.url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200 and (await resp.read()).endswith(b"data: [DONE]\n\n")
            proxy.failing = True
            async with s.post(proxy.url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 503 and (await resp.json())["code"] == 503
            async with s.get(proxy.url + "/health") as resp:  # health checks still pass
                assert resp.status == 200
    finally:
        await proxy.stop()


def _r(start: float, latency: float, outcome: str = "ok", worker: str = "b", code: str | None = None) -> StreamResult:
    return StreamResult(start=start, end=start + latency, outcome=outcome, status=200 if outcome != "failed" else 503,
                        worker=worker, code=code)


def test_summary_of_a_worker_fault() -> None:
    results = [_r(t, 0.2, worker="a" if t % 2 else "b") for t in range(10)]  # healthy: both serve
    results += [_r(10.1, 0.3, "cut_clean", "a", "upstream_error"),  # in flight on the killed worker
                _r(10.5, 3.4),  # waited out first_byte_s, then served by the other one
                *[_r(t, 0.2) for t in range(11, 30)],
                _r(31.0, 0.2, worker="a")]  # back, 1 s after the fault ended
    polls = [Poll(t / 4, t / 4 < 10.5 or t / 4 >= 30, None, 0.0) for t in range(140)]
    row = summarize_fault("kill", results, polls, {"fault": 10.0, "end": 30.0}, "a", "kvroute_retries_total 3.0\n")
    assert (row["failed_before_stream"], row["cut_clean"], row["cut_unclean"], row["hangs"]) == (0, 1, 0, 0)
    assert row["cut_codes"] == ["upstream_error"] and row["slowed"] == 1 and row["retries"] == 3
    assert row["out_of_rotation_after_s"] == 0.5 and row["back_after_s"] == 1.0
    assert row["impact_ended_after_s"] == pytest.approx(3.9)  # the slowed request's end
    assert row["target_met"]
    assert summarize_fault("kill", [*results, _r(12, 0.1, "failed", "b", "upstream_unavailable")], polls,
                           {"fault": 10.0, "end": 30.0}, "a", "")["target_met"] is False


def test_summary_of_a_redis_pause_counts_fail_closed_refusals_as_by_design() -> None:
    results = [_r(t / 2, 0.2) for t in range(20)]
    results += [_r(10 + t / 10, 0.0, "failed", "b", "governance_unavailable") for t in range(50)]
    results += [_r(16 + t / 2, 0.2) for t in range(10)]
    polls = [Poll(t / 4, None, None, 0.0 if t / 4 < 10.5 else min(50.0, (t / 4 - 10.5) * 10)) for t in range(100)]
    row = summarize_fault("redis-fail_closed", results, polls, {"fault": 10.0, "end": 15.0}, None, "")
    assert row["failed_before_stream"] == 50 and row["refused_by_design"] == 50 and row["failed_unexpected"] == 0
    assert row["out_of_rotation_after_s"] == 0.75 and row["back_after_s"] == 0.5 and row["target_met"]


def test_metric_value_sums_matching_samples() -> None:
    text = ('kvroute_errors_total{code="governance_unavailable"} 4.0\n'
            'kvroute_errors_total{code="overloaded"} 1.0\n'
            'kvroute_retries_total{model="tiny"} 2.0\n'
            'kvroute_retries_total{model="big"} 3.0\n')
    assert metric_value(text, "kvroute_errors_total", {"code": "governance_unavailable"}) == 4
    assert metric_value(text, "kvroute_retries_total") == 5
    assert metric_value(text, "kvroute_missing_total") == 0
