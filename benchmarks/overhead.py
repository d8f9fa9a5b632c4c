"""``kvroute bench overhead``: what each router adds in front of an upstream that costs nothing.

A fake vLLM (an aiohttp app in its own process, serving ``--upstreams`` ports) answers
chat completions at once, streamed or not, and exposes the ``/health``, ``/v1/models``
and ``/metrics`` that routers probe. Each router (kvroute per policy, vllm-router, smg)
runs in front of it in turn, and the same client load goes to it and straight to the
upstream ("direct"): ``--requests`` requests at ``--concurrency`` in flight, per mode.

``aiohttp-floor`` is a router too: a pass-through proxy on aiohttp with kvroute's server
and client settings that does nothing else (``floor_proxy_app``), the part of kvroute's
cost that is Python's HTTP stack.

Reported per router and mode: latency p50/p99, added latency over direct (p50 and p99
differences), and req/s at that concurrency (the peak a closed loop reaches). For kvroute
also the time each request spent in kvroute itself (``kvroute_router_added_seconds``,
read from its ``/metrics`` before and after the load): the rest of the added latency is
the extra hop and waiting for the CPU. Client, upstream and router share this machine's
cores, so absolute figures are pessimistic; compare routers within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from kvroute.benchmarks.backends.routers import RouterProcess, http_ok, parse_router, router_command
from kvroute.benchmarks.backends.urls import added_buckets, histogram_quantile
from kvroute.benchmarks.results import percentile
from kvroute.benchmarks.runner import run_standalone
from kvroute.benchmarks.workloads import WorkloadSpec, iter_records

FLOOR = "aiohttp-floor"

_METRICS = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 0.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",engine="0",num_gpu_blocks="4096"} 1.0
"""


def fake_upstream_app(model: str = "tiny") -> web.Application:
    """A vLLM stand-in that answers immediately."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        created = int(time.time())
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "cmpl-fake",
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "ok"},
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for delta, finish in (
            ({"role": "assistant", "content": ""}, None),
            ({"content": "ok"}, None),
            ({}, "stop"),
        ):
            chunk = {
                "id": "cmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):  # as vLLM: a last chunk, no choices
            usage = {"id": "cmpl-fake", "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2,
                                              "prompt_tokens_details": {"cached_tokens": 0}}}
            await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model"}]})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=_METRICS, content_type="text/plain")

    async def traces(request: web.Request) -> web.Response:
        await request.read()  # an OTLP/HTTP receiver that keeps nothing (routers' ?trace=R)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/traces", traces)
    return app


def floor_proxy_app(upstream: str) -> web.Application:
    """The ``aiohttp-floor`` row: the least a Python proxy on aiohttp does, with kvroute's
    server and client settings (uvloop, no access log, one pooled session that asks for
    uncompressed answers and keeps no cookies). It relays each chat completion to
    ``upstream`` byte for byte, streamed or whole, and routes, parses, counts and checks
    nothing: the HTTP stack's share of a kvroute request."""

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
        async with aiohttp.ClientSession(connector=connector, headers={"Accept-Encoding": "identity"},
                                         cookie_jar=aiohttp.DummyCookieJar()) as session:
            app[_SESSION] = session
            yield

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with request.app[_SESSION].post(f"{upstream}/v1/chat/completions", data=body,
                                              headers={"content-type": "application/json"}) as resp:
            if resp.content_type != "text/event-stream":
                return web.Response(body=await resp.read(), status=resp.status, content_type=resp.content_type)
            out = web.StreamResponse(status=resp.status, headers={"content-type": "text/event-stream"})
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    return app


_SESSION = web.AppKey("session", aiohttp.ClientSession)


def _serve_floor(port: int, upstream: str) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    web.run_app(floor_proxy_app(upstream), host="127.0.0.1", port=port, access_log=None, print=None)


async def _serve_fake(ports: Sequence[int]) -> None:
    runners = []
    for port in ports:
        runner = web.AppRunner(fake_upstream_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    await asyncio.Event().wait()


class _Tally:
    """Latencies of the answered requests and a count of the rest."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0

    async def send(self, session: aiohttp.ClientSession, url: str, body: dict, first_event: bool = False) -> None:
        """``first_event``: the latency is the time to the answer's first bytes (a stream's
        first event: its time to first token), not to its end."""
        start = time.perf_counter()
        end = None
        try:
            async with session.post(f"{url}/v1/chat/completions", json=body,
                                    timeout=aiohttp.ClientTimeout(total=30)) as resp:
                if first_event:
                    await resp.content.readany()
                    end = time.perf_counter()
                await resp.read()
                ok = resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            ok = False
        if ok:
            self.latencies.append((end or time.perf_counter()) - start)
        else:
            self.errors += 1


async def _load(
    url: str, bodies: Sequence[dict], concurrency: int, stream: bool
) -> tuple[list[float], int, float]:
    """``bodies`` with ``concurrency`` in flight (a closed loop: the router's peak)."""
    tally = _Tally()
    it = iter(bodies)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker() -> None:
            for body in it:
                await tally.send(session, url, {**body, "stream": stream})

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return tally.latencies, tally.errors, time.perf_counter() - start


async def _open_loop(url: str, bodies: Sequence[dict], rate: float,
                     stream: bool = False) -> tuple[list[float], int, float]:
    """``bodies`` sent at ``rate`` a second whatever the answers (an open loop: the added
    latency users feel at that offered load, not a closed loop's peak). ``stream``: as
    streams, timed to their first event."""
    tally = _Tally()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tasks = []
        for i, body in enumerate(bodies):
            delay = t0 + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(tally.send(session, url, {**body, "stream": stream}, stream)))
        await asyncio.gather(*tasks)
        return tally.latencies, tally.errors, loop.time() - t0


def _load_curve(url: str, bodies: list[dict], rates: list[float], seconds: float,
                stream: bool = False) -> list[dict[str, Any]]:
    """Latency at each offered rate (``stream``: time to the first event), ``seconds`` of
    load each."""
    points = []
    for rate in rates:
        n = max(20, int(rate * seconds))
        before = _added_snapshot(url)
        lat, errors, elapsed = asyncio.run(_open_loop(url, [bodies[i % len(bodies)] for i in range(n)], rate,
                                                      stream))
        points.append({"rate": rate, "p50_ms": _ms(percentile(lat, 50)), "p99_ms": _ms(percentile(lat, 99)),
                       "achieved_rps": round(len(lat) / elapsed, 1), "errors": errors,
                       **_in_kvroute(before, _added_snapshot(url))})
    return points


def _added_snapshot(url: str) -> dict[float, float] | None:
    """A kvroute router's ``kvroute_router_added_seconds`` buckets now; None for a router
    (or the upstream) without them."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return None
    return added_buckets(text) or None


def _in_kvroute(before: dict[float, float] | None, after: dict[float, float] | None) -> dict[str, float | None]:
    """p50 and p99 of the time in kvroute itself over the requests between two snapshots,
    interpolated within the histogram's buckets (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5 ms...)."""
    if before is None or after is None:
        return {}
    delta = {le: count - before.get(le, 0.0) for le, count in after.items()}
    return {"in_kvroute_p50_ms": _ms(histogram_quantile(delta, 0.5)),
            "in_kvroute_p99_ms": _ms(histogram_quantile(delta, 0.99)),
            "in_kvroute_requests": round(delta.get(float("inf"), 0.0))}


def _cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system, all threads) a process and its children (``kvroute serve
    --procs N``'s processes) have used; None where /proc is not."""
    stats = {}
    for entry in os.listdir("/proc") if pid is not None and os.path.isdir("/proc") else ():
        try:
            with open(f"/proc/{entry}/stat") as f:
                stats[int(entry)] = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue
    if pid not in stats:
        return None
    tree = {pid} | {p for p, fields in stats.items() if int(fields[1]) == pid}
    return sum(int(stats[p][11]) + int(stats[p][12]) for p in tree) / os.sysconf("SC_CLK_TCK")


def _measure(url: str, bodies: list[dict], warmup: list[dict], concurrency: int,
             pid: int | None = None, upstream_pid: int | None = None) -> dict[str, Any]:
    """Latency and throughput per mode; with ``pid``, the router's CPU time per request too,
    which other load on the machine disturbs less than latency. The client's (this
    process's) and, with ``upstream_pid``, the fake upstream's CPU per request show how
    much of the machine was left to the router."""
    out: dict[str, Any] = {}
    for stream in (False, True):
        asyncio.run(_load(url, warmup, concurrency, stream))
        added0 = _added_snapshot(url)
        cpu0, client0, up0 = _cpu_seconds(pid), time.process_time(), _cpu_seconds(upstream_pid)
        lat, errors, elapsed = asyncio.run(_load(url, bodies, concurrency, stream))
        cpu1, client1, up1 = _cpu_seconds(pid), time.process_time(), _cpu_seconds(upstream_pid)
        added = _in_kvroute(added0, _added_snapshot(url))
        mode = "stream" if stream else "plain"
        out[mode] = {
            "p50_ms": _ms(percentile(lat, 50)),
            "p99_ms": _ms(percentile(lat, 99)),
            "rps": round(len(lat) / elapsed, 1),
            "errors": errors,
            "cpu_us_per_request": _per_request(cpu0, cpu1, len(bodies)),
            "client_cpu_us_per_request": _per_request(client0, client1, len(bodies)),
            "upstream_cpu_us_per_request": _per_request(up0, up1, len(bodies)),
            **added,
        }
    return out


def _per_request(before: float | None, after: float | None, n: int) -> int | None:
    return round((after - before) / n * 1e6) if before is not None and after is not None else None


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 3)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``kvroute bench overhead``."""
    p.add_argument(
        "--routers",
        default="prefix,round_robin,vllm-router:round_robin,"
        "vllm-router:cache_aware,smg:cache_aware",
    )
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--upstreams", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--base-port", type=int, default=8280, help="upstreams here, routers after")
    p.add_argument("--tokenizer", help="tokenizer folder for kvroute (default: the tiny model)")
    p.add_argument("--out", default="bench-out/overhead")
    p.add_argument("--rates", default="",
                   help="also an open-loop load curve: comma list of offered req/s, non-streaming "
                        "(e.g. 100,300,600,1200); plotted as added latency against offered load")
    p.add_argument("--rate-seconds", type=float, default=5.0, help="seconds of load per rate")
    p.add_argument("--rate-stream", action="store_true",
                   help="the load curve's requests stream, timed to their first event (time to first token)")
    p.add_argument(
        "--fake", action="store_true", help=argparse.SUPPRESS
    )  # internal: be the upstream
    p.add_argument("--floor", metavar="UPSTREAM", help=argparse.SUPPRESS)  # internal: be aiohttp-floor


def main(argv: list[str] | None = None) -> int:
    """``python -m kvroute.benchmarks.overhead``: as ``kvroute bench overhead``."""
    return run_standalone("overhead", __doc__, add_arguments, run, argv)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``kvroute bench overhead`` with parsed ``args``; ``argv`` (its own arguments) is
    recorded as the command."""
    ports = [args.base_port + i for i in range(args.upstreams)]
    if args.fake:
        asyncio.run(_serve_fake(ports))
        return 0
    if args.floor:
        _serve_floor(args.base_port, args.floor)
        return 0
    from tqdm import tqdm

    from kvroute.router.local.tinymodel import build_tiny_model

    tokenizer = args.tokenizer or str(build_tiny_model())
    spec = WorkloadSpec(
        requests=args.requests, groups=16, prefix_tokens=args.prompt_tokens, max_tokens=1
    )
    bodies = [r.body for r in iter_records(spec)]
    warmup = bodies[: min(100, len(bodies))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    upstream = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvroute.benchmarks.overhead",
            "--fake",
            "--base-port",
            str(args.base_port),
            "--upstreams",
            str(args.upstreams),
        ],
        start_new_session=True,
    )
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    results: dict[str, Any] = {}
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    curves: dict[str, list[dict[str, Any]]] = {}
    try:
        deadline = time.monotonic() + 30
        while not all(http_ok(f"{u}/health") for u in urls):
            if time.monotonic() > deadline or upstream.poll() is not None:
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.2)
        names = ["direct", *[n.strip() for n in args.routers.split(",") if n.strip()]]
        for i, name in enumerate(tqdm(names, desc="overhead", file=sys.stderr)):
            if name == "direct":
                results[name] = _measure(urls[0], bodies, warmup, args.concurrency, upstream_pid=upstream.pid)
                if rates:
                    curves[name] = _load_curve(urls[0], bodies, rates, args.rate_seconds, args.rate_stream)
                continue
            port = args.base_port + args.upstreams + i
            if name == FLOOR:
                cmd = [sys.executable, "-m", "kvroute.benchmarks.overhead", "--floor", urls[0],
                       "--base-port", str(port)]
            else:
                cmd = router_command(parse_router(name), port, urls, "tiny", tokenizer, 32, out / "logs",
                                     otlp_endpoint=urls[0])
            proc = RouterProcess(
                cmd,
                port,
                out / "logs" / f"router-{''.join(c if c.isalnum() else '-' for c in name)}.log",
            )
            try:
                proc.wait_ready()
                results[name] = _measure(proc.url, bodies, warmup, args.concurrency, pid=proc.proc.pid,
                                         upstream_pid=upstream.pid)
                if rates:
                    curves[name] = _load_curve(proc.url, bodies, rates, args.rate_seconds, args.rate_stream)
            except (RuntimeError, TimeoutError) as exc:
                results[name] = {"failure": str(exc)[:300]}
            finally:
                proc.stop()
    finally:
        upstream.terminate()
        upstream.wait(10)
    add_overhead(results)
    doc = {
        "command": "kvroute bench overhead " + shlex.join(argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "prompt_tokens": args.prompt_tokens,
        "routers": results,
    }
    if curves:
        add_curve_overhead(curves)
        doc["load_curve"] = curves
        doc["load_curve_stream"] = args.rate_stream
        plot_load_curve(curves, out / "overhead_load.png", args.rate_stream)
    (out / "overhead.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = render_overhead(doc)
    (out / "overhead.md").write_text(md)
    print(md)
    return 0


def add_curve_overhead(curves: dict[str, list[dict[str, Any]]]) -> None:
    """Each point's latency over ``direct`` at the same offered rate."""
    direct = {p["rate"]: p for p in curves.get("direct", [])}
    for points in curves.values():
        for p in points:
            base = direct.get(p["rate"])
            if base and p["p50_ms"] is not None and base["p50_ms"] is not None:
                p["added_p50_ms"] = round(p["p50_ms"] - base["p50_ms"], 3)
                p["added_p99_ms"] = round(p["p99_ms"] - base["p99_ms"], 3)


def plot_load_curve(curves: dict[str, list[dict[str, Any]]], path: Path, stream: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    what = "time to first event added" if stream else "added latency"
    for ax, key, title in ((axes[0], "added_p50_ms", f"{what}, p50"), (axes[1], "added_p99_ms", f"{what}, p99")):
        for name, points in curves.items():
            pts = [(p["rate"], p[key]) for p in points if p.get(key) is not None and not p["errors"]]
            if name != "direct" and pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(bottom=-1.0)  # below direct is noise (direct itself overloaded)
        ax.set_xlabel("offered load (req/s, open loop)")
        ax.set_ylabel("ms over calling the upstream directly")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_overhead(results: dict[str, Any]) -> None:
    """Add each router's latency over ``direct`` (``added_p50_ms``, ``added_p99_ms``) per mode."""
    direct = results.get("direct", {})
    for r in results.values():
        for mode, m in r.items():
            base = direct.get(mode) if isinstance(direct, dict) else None
            if (
                not isinstance(m, dict)
                or not base
                or m.get("p50_ms") is None
                or base.get("p50_ms") is None
            ):
                continue
            m["added_p50_ms"] = round(m["p50_ms"] - base["p50_ms"], 3)
            m["added_p99_ms"] = round(m["p99_ms"] - base["p99_ms"], 3)


def render_overhead(doc: dict[str, Any]) -> str:
    lines = [
        f"# Router overhead ({doc['requests']} requests per mode, "
        f"concurrency {doc['concurrency']}, ~{doc['prompt_tokens']}-token prompts)",
        "",
        f"command: `{doc['command']}`",
        "",
        "| router | mode | p50 ms | p99 ms | added p50 ms | added p99 ms | in kvroute p50 / p99 ms | req/s "
        "| router CPU µs/req | errors | client CPU µs/req | upstream CPU µs/req |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in doc["routers"].items():
        if "failure" in r:
            lines.append(f"| {name} | – | failed: {r['failure'][:80]} | | | | | | | | | |")
            continue
        for mode, m in r.items():
            lines.append(
                f"| {name} | {mode} | {m['p50_ms']} | {m['p99_ms']} | {m.get('added_p50_ms', '–')} "
                f"| {m.get('added_p99_ms', '–')} | {_in_kvroute_cell(m)} | {m['rps']} "
                f"| {m.get('cpu_us_per_request') or '–'} | {m['errors']} "
                f"| {m.get('client_cpu_us_per_request') or '–'} | {m.get('upstream_cpu_us_per_request') or '–'} |"
            )
    curves = doc.get("load_curve")
    if curves:
        what = ("streaming: time to first event added" if doc.get("load_curve_stream")
                else "non-streaming: added latency")
        lines += ["", f"Open loop, {what}, p50 / p99 (ms) at each offered load (req/s); "
                  "errors in brackets", "",
                  "| router | " + " | ".join(f"{p['rate']:g}" for p in next(iter(curves.values()))) + " |",
                  "|---|" + "---|" * len(next(iter(curves.values())))]
        for name, points in curves.items():
            cells = [f"{p.get('added_p50_ms', p['p50_ms'])} / {p.get('added_p99_ms', p['p99_ms'])}"
                     + (f" [{p['errors']}]" if p["errors"] else "") for p in points]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        own = {name: points for name, points in curves.items() if any("in_kvroute_p50_ms" in p for p in points)}
        if own:
            lines += ["", "Time in kvroute itself at each offered load (`kvroute_router_added_seconds`: "
                      "arrival to the worker call, and the worker's first bytes to the client's), "
                      "p50 / p99 (ms)", "",
                      "| router | " + " | ".join(f"{p['rate']:g}" for p in next(iter(own.values()))) + " |",
                      "|---|" + "---|" * len(next(iter(own.values())))]
            for name, points in own.items():
                lines.append(f"| {name} | " + " | ".join(_in_kvroute_cell(p) for p in points) + " |")
    lines += ["", "in kvroute: from the router's `kvroute_router_added_seconds` histogram, interpolated "
              "within its buckets; the rest of the added latency is the extra hop and waiting for a core."]
    return "\n".join(lines) + "\n"


def _in_kvroute_cell(m: dict[str, Any]) -> str:
    if m.get("in_kvroute_p50_ms") is None:
        return "–"
    return f"{m['in_kvroute_p50_ms']} / {m['in_kvroute_p99_ms']}"


if __name__ == "__main__":
    raise SystemExit(main())
