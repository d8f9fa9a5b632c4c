"""CLI subcommands (sim run, trace, ceiling, dispatch of every documented invocation) and the
pieces of the real-fleet and overhead runs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import orjson
import pytest

from kvroute.benchmarks import agreement, ceiling, cli, overhead
from kvroute.benchmarks.backends.routers import parse_router, router_command
from kvroute.benchmarks.cli import build_parser, command_argv, main
from kvroute.benchmarks.overhead import FLOOR, add_overhead, fake_upstream_app, floor_proxy_app, render_overhead
from kvroute.benchmarks.runner import drive, write_request_log
from kvroute.benchmarks.workloads import WorkloadSpec, iter_records, read_trace, workload_from_args


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


def test_explicit_run_is_the_default_command(tmp_path) -> None:
    flags = ["--fleet", "sim", "--workers", "2", "--requests", "24", "--groups", "3", "--prefix-tokens", "200",
             "--kv-blocks", "64", "--policies", "prefix", "--no-oracle"]
    assert main(flags + ["--out", str(tmp_path / "a")]) == 0
    assert main(["run", *flags, "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    # the command is recorded without "run": the two invocations are the same command
    assert a["command"] == "kvroute bench " + " ".join(flags + ["--out", str(tmp_path / "a")])
    assert b["command"] == "kvroute bench " + " ".join(flags + ["--out", str(tmp_path / "b")])
    assert a["workload"] == b["workload"] and a["fleet"] == b["fleet"]
    for key in ("hit_rate", "completed", "per_worker_requests", "prefix_hits_tokens"):
        assert a["routers"]["prefix"][key] == b["routers"]["prefix"][key]


# Every invocation README.md and docs/*.md show (flags abridged where they repeat), with the
# command it must reach and flags it must set.
DOCUMENTED = [
    ("--fleet local --workers 4 --kv-blocks 320 --workload shared-prefix --requests 192 --groups 16 "
     "--prefix-tokens 1800 --concurrency 8 --policies prefix,round_robin,vllm-router:cache_aware,smg:cache_aware "
     "--out LOCAL", cli.run_routing, {"fleet": "local", "workers": "4", "kv_blocks": 320, "concurrency": 8,
                                      "prefix_tokens": 1800, "out": "LOCAL"}),
    ("--fleet local --workers 4 --concurrency 8 --out DIR --policies "
     "prefix,prefix?kv_events=1,smg:cache_aware,vllm-router:cache_aware --kv-blocks 160 --workload agent "
     "--requests 288 --groups 24", cli.run_routing,
     {"fleet": "local", "policies": "prefix,prefix?kv_events=1,smg:cache_aware,vllm-router:cache_aware",
      "workload": "agent", "requests": 288, "groups": 24}),
    ("--fleet local --workers 3 --kv-blocks 240 --workload shared-prefix --requests 108 --groups 9 "
     "--prefix-tokens 1800 --concurrency 0 --rate 2 --policies prefix,round_robin --out DIR", cli.run_routing,
     {"workers": "3", "kv_blocks": 240, "concurrency": 0, "rate": 2.0, "groups": 9}),
    ("--fleet sim --workers 8,64,512 --per-worker --requests 100 --groups 4 --concurrency 2 "
     "--policies round_robin,prefix --out SWEEP", cli.run_routing,
     {"fleet": "sim", "workers": "8,64,512", "per_worker": True, "requests": 100, "concurrency": 2}),
    ("--fleet sim --workers 4 --concurrency 8 --tokenization tiny --index-blocks 4096 "
     "--policies prefix,prefix?kv_events=1 --seed 3", cli.run_routing,
     {"tokenization": "tiny", "index_blocks": 4096, "seed": 3}),
    ("--fleet urls --worker-url http://h:8000 --worker-url http://h:8001 --policies prefix", cli.run_routing,
     {"fleet": "urls", "worker_url": ["http://h:8000", "http://h:8001"]}),
    ("", cli.run_routing, {"fleet": "sim", "workers": "8", "out": "bench-out", "workload": "shared-prefix"}),
    ("run --fleet sim --workers 8", cli.run_routing, {"fleet": "sim", "workers": "8"}),
    ("overhead --requests 2000 --concurrency 32 --out OVERHEAD", overhead.run,
     {"requests": 2000, "concurrency": 32, "out": "OVERHEAD", "prompt_tokens": 1000}),
    ("overhead --routers prefix --requests 2000 --concurrency 32", overhead.run,
     {"routers": "prefix", "out": "bench-out/overhead"}),
    ("trace --workload agent --requests 200 --out trace.jsonl", cli.run_trace,
     {"workload": "agent", "requests": 200, "out": "trace.jsonl"}),
    ("fleet --workers 4 --kv-blocks 320 --worker-port 8260 --events-port 18260", cli.run_fleet,
     {"workers": 4, "kv_blocks": 320, "worker_port": 8260, "events_port": 18260}),
    ("agreement --worker-url http://127.0.0.1:8201 --worker-url http://127.0.0.1:8204 --events-port-offset -2500 "
     "--workload shared-prefix --requests 192 --groups 16 --prefix-tokens 1800 --seed 4 --out DIR", agreement.run,
     {"worker_url": ["http://127.0.0.1:8201", "http://127.0.0.1:8204"], "events_port_offset": -2500, "seed": 4,
      "router": "prefix?kv_events=1&replicas=2"}),
    ("ceiling --workers 4 --kv-blocks 320 --workload shared-prefix --requests 192 --groups 16 --prefix-tokens 1800 "
     "--results LOCAL/results.json --out CEILING", ceiling.run,
     {"workers": 4, "kv_blocks": 320, "results": "LOCAL/results.json", "out": "CEILING", "tokenization": "tiny"}),
    ("ceiling --workers 4 --kv-blocks 160 --workload multi-turn --requests 288 --groups 24 --out DIR", ceiling.run,
     {"kv_blocks": 160, "workload": "multi-turn", "groups": 24}),
]


@pytest.mark.parametrize(("line", "handler", "expected"), DOCUMENTED, ids=[d[0][:40] or "(none)" for d in DOCUMENTED])
def test_documented_invocations_reach_their_command(line, handler, expected) -> None:
    args = build_parser().parse_args(command_argv(line.split()))
    assert args.handler is handler
    assert {k: getattr(args, k) for k in expected} == expected


def test_demo_runs_the_routing_benchmark_on_a_local_fleet(monkeypatch) -> None:
    from kvroute.benchmarks import demo

    seen = {}

    def fake_run(args, argv):
        seen.update(args=args, argv=argv)
        return 0

    monkeypatch.setitem(cli.COMMANDS, "run", cli.COMMANDS["run"]._replace(run=fake_run))
    assert demo.main(["--workers", "2", "--out", "D"]) == 0
    args = seen["args"]
    assert (args.fleet, args.workers, args.kv_blocks, args.requests, args.groups) == ("local", "2", 240, 108, 9)
    # Open loop: the same arrival times for every router, so their latencies compare.
    assert (args.concurrency, args.rate, args.policies, args.out, args.no_oracle) == (
        0, 2.0, "prefix,round_robin", "D", False)
    assert seen["argv"][:2] == ["--fleet", "local"]  # recorded as "kvroute bench --fleet local ..."

    assert demo.main(["--rate", "0", "--concurrency", "4"]) == 0
    assert (seen["args"].concurrency, seen["args"].rate) == (4, 0.0)
    for bad in (["--rate", "-1"], ["--rate", "0", "--concurrency", "0"]):
        with pytest.raises(SystemExit):
            demo.main(bad)


def test_a_real_fleet_run_records_how_it_sent_requests() -> None:
    assert cli._loop(6, 0.0) == "closed, concurrency 6"
    assert cli._loop(0, 3.0) == "open, 3 req/s"
    assert cli._loop(0, 0.0) == "open, all at once"


@pytest.mark.parametrize("command", ["run", "trace", "agreement", "ceiling"])
def test_every_command_reads_the_workload_flags_alike(command) -> None:
    required = {"trace": ["--out", "t"], "ceiling": ["--out", "c"],
                "agreement": ["--worker-url", "http://w", "--events-port-offset", "1"]}.get(command, [])
    flags = ["--workload", "hot-prefix", "--requests", "7", "--groups", "3", "--prefix-tokens", "90",
             "--question-tokens", "5", "--max-tokens", "2", "--hot-share", "0.5", "--turns", "4", "--rate", "1.5",
             "--seed", "9", "--model", "m", "--trace", "x.jsonl"]
    args = build_parser().parse_args([command, *required, *flags])
    assert workload_from_args(args) == WorkloadSpec(
        "hot-prefix", seed=9, requests=7, groups=3, prefix_tokens=90, question_tokens=5, max_tokens=2, rate=1.5,
        model="m", hot_share=0.5, turns=4, trace_path="x.jsonl")
    # and without them, each command's workload is WorkloadSpec's default
    assert workload_from_args(build_parser().parse_args([command, *required])) == WorkloadSpec()


def test_help_lists_the_commands_and_a_bad_command_is_an_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kvroute bench [-h] COMMAND")
    for name in ("run", "overhead", "trace", "fleet", "agreement", "ceiling"):
        assert re.search(rf"\n {{4}}{name}\s", out), name
    with pytest.raises(SystemExit) as exc:
        main(["ceiling", "--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("usage: kvroute bench ceiling")
    with pytest.raises(SystemExit) as exc:
        main(["nope"])
    assert exc.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_ceiling_subcommand(tmp_path) -> None:
    out = tmp_path / "c"
    argv = ["ceiling", "--workers", "2", "--kv-blocks", "40", "--tokenization", "words", "--requests", "24",
            "--groups", "3", "--prefix-tokens", "200", "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads((out / "ceiling.json").read_text())
    assert doc["command"] == "kvroute bench " + " ".join(argv)
    assert doc["requests"] == 24 and doc["fleet"]["workers"] == 2 and doc["ceiling"]["capacity_blocks"] == 80
    assert doc["workload"] == WorkloadSpec(requests=24, groups=3, prefix_tokens=200).describe()


def test_trace_subcommand(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    assert main(["trace", "--workload", "agent", "--requests", "12", "--seed", "2", "--out", str(path)]) == 0
    assert list(read_trace(path)) == list(iter_records(WorkloadSpec("agent", seed=2, requests=12)))


def test_bad_workload_is_an_argparse_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--workload", "nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: kvroute bench run") and "argument --workload: invalid choice: 'nope'" in err


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


async def test_the_aiohttp_floor_relays_answers_and_streams_byte_for_byte(aiohttp_server, aiohttp_client) -> None:
    upstream = await aiohttp_server(fake_upstream_app())
    up_url = str(upstream.make_url("")).rstrip("/")
    floor = await aiohttp_client(floor_proxy_app(up_url))
    direct = await aiohttp_client(upstream)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for b in (body, {**body, "stream": True}):
        via = await floor.post("/v1/chat/completions", json=b)
        straight = await direct.post("/v1/chat/completions", json=b)
        assert via.status == straight.status == 200
        assert via.content_type == straight.content_type
        assert _no_ids(await via.read()) == _no_ids(await straight.read())
    assert (await floor.get("/health")).status == 200


def _no_ids(raw: bytes) -> bytes:
    """The fake's answers differ only in their creation time."""
    return re.sub(rb'"created":\s*\d+', b'"created":0', raw)


def test_overhead_table() -> None:
    results = {
        "direct": {"plain": {"p50_ms": 1.0, "p99_ms": 2.0, "rps": 900.0, "errors": 0}},
        "prefix": {"plain": {"p50_ms": 1.5, "p99_ms": 4.0, "rps": 600.0, "errors": 0, "cpu_us_per_request": 410,
                             "client_cpu_us_per_request": 250, "upstream_cpu_us_per_request": 90}},
        "smg:cache_aware": {"failure": "boom"},
    }
    add_overhead(results)
    assert results["prefix"]["plain"]["added_p50_ms"] == 0.5
    md = render_overhead(
        {"requests": 1, "concurrency": 1, "prompt_tokens": 1, "command": "c", "routers": results}
    )
    assert "| prefix | plain | 1.5 | 4.0 | 0.5 | 2.0 | – | 600.0 | 410 | 0 | 250 | 90 |" in md and "failed: boom" in md


def test_the_time_in_kvroute_is_read_between_two_snapshots() -> None:
    from kvroute.benchmarks.overhead import _in_kvroute

    inf = float("inf")
    before = {0.001: 10.0, 0.002: 10.0, inf: 10.0}  # the warm-up: all under 1 ms
    after = {0.001: 10.0, 0.002: 20.0, inf: 30.0}  # the load: half 1-2 ms, half past the last bound
    assert _in_kvroute(before, after) == {"in_kvroute_p50_ms": 2.0, "in_kvroute_p99_ms": 2.0,
                                          "in_kvroute_requests": 20}
    assert _in_kvroute(None, after) == {} and _in_kvroute(before, None) == {}


def _free_run(n: int) -> int:
    """A first port of ``n`` consecutive free ones."""
    import random
    import socket

    for _ in range(50):
        base = random.randrange(20000, 30000)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free run of ports")


def test_overhead_bench_runs_end_to_end_and_reads_kvroute_s_own_time(tmp_path, tiny_model_dir) -> None:
    """``kvroute bench overhead`` with a real kvroute process and the aiohttp floor: every
    answered kvroute request is in its own-time histogram; the floor and the upstream have none."""
    base = _free_run(4)  # the fake upstream, then direct's slot, the floor and kvroute
    assert overhead.main(["--routers", "aiohttp-floor,prefix?tokenizer=0", "--requests", "60", "--concurrency", "4",
                          "--upstreams", "1", "--base-port", str(base), "--rates", "40", "--rate-seconds", "1",
                          "--tokenizer", str(tiny_model_dir), "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "overhead.json").read_text())
    for mode in ("plain", "stream"):
        kv = doc["routers"]["prefix?tokenizer=0"][mode]
        assert kv["errors"] == 0 and kv["in_kvroute_requests"] == 60
        assert 0 < kv["in_kvroute_p50_ms"] <= kv["in_kvroute_p99_ms"] < kv["p99_ms"]
        assert "in_kvroute_p50_ms" not in doc["routers"][FLOOR][mode]
        assert "in_kvroute_p50_ms" not in doc["routers"]["direct"][mode]
    point = doc["load_curve"]["prefix?tokenizer=0"][0]
    assert point["errors"] == 0 and point["in_kvroute_requests"] == 40
    md = (tmp_path / "overhead.md").read_text()
    assert "Time in kvroute itself at each offered load" in md and (tmp_path / "overhead_load.png").exists()


def test_the_client_and_the_upstream_cpu_are_measured_beside_the_routers() -> None:
    """_measure reads its own process's CPU (the client) and the fake upstream's from /proc."""
    import socket
    import subprocess
    import time

    from kvroute.benchmarks.backends.routers import http_ok
    from kvroute.benchmarks.overhead import _measure

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    upstream = subprocess.Popen([sys.executable, "-m", "kvroute.benchmarks.overhead", "--fake", "--base-port",
                                 str(port), "--upstreams", "1"], start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not http_ok(f"{url}/health"):
            assert time.monotonic() < deadline and upstream.poll() is None, "fake upstream did not start"
            time.sleep(0.2)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        out = _measure(url, [body] * 1000, [body] * 5, 4, upstream_pid=upstream.pid)  # CPU ticks are 10 ms
    finally:
        upstream.terminate()
        upstream.wait(10)
    for mode in ("plain", "stream"):
        m = out[mode]
        assert m["errors"] == 0 and m["client_cpu_us_per_request"] > 0 and m["upstream_cpu_us_per_request"] > 0
        assert m["cpu_us_per_request"] is None  # no router here


def test_router_cpu_time_is_read_from_proc() -> None:
    import os

    from kvroute.benchmarks.overhead import _cpu_seconds

    before = _cpu_seconds(os.getpid())
    sum(i * i for i in range(2_000_000))  # burn some CPU
    after = _cpu_seconds(os.getpid())
    assert before is not None and after is not None and after > before
    assert _cpu_seconds(None) is None and _cpu_seconds(2**31 - 1) is None


async def test_open_loop_load_keeps_its_rate_and_the_curve_is_tabled_and_plotted(aiohttp_server, tmp_path) -> None:
    import time

    from kvroute.benchmarks.overhead import _open_loop, add_curve_overhead, plot_load_curve

    server = await aiohttp_server(fake_upstream_app())
    url = str(server.make_url("")).rstrip("/")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    start = time.perf_counter()
    lat, errors, elapsed = await _open_loop(url, [body] * 20, rate=40.0)
    assert errors == 0 and len(lat) == 20
    assert time.perf_counter() - start >= 19 / 40  # sent on schedule, not as fast as answered
    curves = {"direct": [{"rate": 40.0, "p50_ms": 1.0, "p99_ms": 2.0, "achieved_rps": 40.0, "errors": 0}],
              "prefix": [{"rate": 40.0, "p50_ms": 3.5, "p99_ms": 9.0, "achieved_rps": 40.0, "errors": 0}]}
    add_curve_overhead(curves)
    assert curves["prefix"][0]["added_p50_ms"] == 2.5 and curves["prefix"][0]["added_p99_ms"] == 7.0
    md = render_overhead({"requests": 1, "concurrency": 1, "prompt_tokens": 1, "command": "c",
                          "routers": {}, "load_curve": curves})
    assert "| prefix | 2.5 / 7.0 |" in md
    plot_load_curve(curves, tmp_path / "load.png")
    assert (tmp_path / "load.png").stat().st_size > 1000


async def test_a_streaming_load_curve_times_the_first_event(aiohttp_server, tmp_path) -> None:
    """--rate-stream: the latency is the time to the stream's first event, not to its end."""
    import asyncio

    from aiohttp import web

    from kvroute.benchmarks.overhead import _open_loop

    async def slow_tail(request: web.Request) -> web.StreamResponse:
        assert (await request.json())["stream"] is True
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n')
        await asyncio.sleep(0.3)  # the rest of the answer
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", slow_tail)
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    first, errors, _ = await _open_loop(url, [body] * 4, rate=20.0, stream=True)
    assert errors == 0 and len(first) == 4 and max(first) < 0.2
    md = render_overhead({"requests": 1, "concurrency": 1, "prompt_tokens": 1, "command": "c", "routers": {},
                          "load_curve": {"direct": [{"rate": 20.0, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 0}]},
                          "load_curve_stream": True})
    assert "streaming: time to first event added" in md


def test_tokenizer_0_runs_kvroute_in_approximate_mode(tmp_path) -> None:
    plain = router_command(parse_router("prefix?tokenizer=0"), 8250, ["http://a"], "tiny", "/tok", 32, tmp_path)
    cfg = json.loads(Path(plain[-1]).read_text())
    assert "tokenizer" not in cfg["models"][0] and cfg["models"][0]["policy_options"] == {}
    with_tok = router_command(parse_router("prefix?procs=2"), 8251, ["http://a"], "tiny", "/tok", 32, tmp_path)
    assert json.loads(Path(with_tok[-1]).read_text())["models"][0]["tokenizer"] == "/tok"
    with pytest.raises(SystemExit, match="tokenizer=0 is for real routers"):
        main(["run", "--fleet", "sim", "--policies", "prefix?tokenizer=0", "--requests", "8",
              "--out", str(tmp_path / "sim")])


@pytest.mark.parametrize(("groups", "sent"), [(3, 6), (20, 16)])
async def test_the_fleet_is_warmed_with_the_workloads_shape_not_its_prompts(aiohttp_server, groups, sent) -> None:
    """Each group's first two requests (at most 8 a worker), to the group's oracle worker,
    under a nonce of their own: no router measured later finds them cached."""
    import asyncio

    from kvroute.benchmarks.backends.mock import SEEN, fake_worker
    from kvroute.benchmarks.backends.urls import RealFleet, warm_fleet

    workers = [await aiohttp_server(fake_worker(f"w{i}")) for i in range(2)]
    fleet = RealFleet(tuple(str(w.make_url("")).rstrip("/") for w in workers))
    spec = WorkloadSpec(requests=60, groups=groups, prefix_tokens=200, nonce="run")
    assert await asyncio.to_thread(warm_fleet, fleet, spec) == sent
    seen = [body for w in workers for body in w.app[SEEN]]
    assert len(seen) == sent
    systems = {w.app[SEEN][0]["messages"][0]["content"]: i for i, w in enumerate(workers)}
    for i, w in enumerate(workers):  # a group's requests all went to one worker
        assert all(systems.setdefault(b["messages"][0]["content"], i) == i for b in w.app[SEEN])
    measured = {json.dumps(r.body["messages"][0]) for r in iter_records(spec)}
    assert not measured & {json.dumps(b["messages"][0]) for b in seen}
