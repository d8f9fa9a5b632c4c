"""``kvroute bench``: run a routing benchmark and write its report.

    kvroute bench --fleet sim --workers 8,64,512 --workload shared-prefix --requests 5000 \\
        --policies round_robin,prefix --out DIR
    kvroute bench --fleet local --workers 4 --kv-blocks 320 --workload hot-prefix \\
        --policies prefix,round_robin,vllm-router:cache_aware,smg:cache_aware --out DIR
    kvroute bench --fleet urls --worker-url http://h:8000 --worker-url ... --policies ...
    kvroute bench overhead --out DIR
    kvroute bench cache --requests 2000 --out DIR
    kvroute bench reliability --streams 1000 --rounds 3 --restart-streams 200 --out DIR
    kvroute bench reliability --parts faults --fleet local --out DIR
    kvroute bench trace --workload agent --requests 200 --out trace.jsonl
    kvroute bench fleet --workers 4 --kv-blocks 320 --worker-port 8260 --events-port 18260
    kvroute bench agreement --worker-url ... --events-port-offset 10000 --out DIR
    kvroute bench ceiling --workers 4 --kv-blocks 160 --workload shared-prefix --out DIR
    kvroute bench hot-sweep --policies 'before=prefix?hot_load=0,prefix' --out DIR

Without a command (no arguments, or an option first) the routing benchmark ``run`` is
meant: ``kvroute bench --fleet sim ...`` is ``kvroute bench run --fleet sim ...``; see
``kvroute bench run --help`` for its options and ``kvroute bench COMMAND --help`` for the
others'. The oracle (groups pinned to workers by hand) is added unless ``--no-oracle``,
because ``hit_rate_vs_oracle`` needs it. Also runnable as ``python -m kvroute.benchmarks.cli``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import xxhash

from kvroute.benchmarks import agreement, cache_bench, ceiling, hot_sweep, overhead, reliability
from kvroute.benchmarks.runner import progress_bar
from kvroute.benchmarks.workloads import add_workload_args, iter_records, workload_from_args, write_trace

# The command meant when the first argument is an option (or there is none).
DEFAULT_COMMAND = "run"


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the routing benchmark (``kvroute bench [run]``), the workload's included."""
    p.add_argument("--fleet", choices=("sim", "local", "urls"), default="sim")
    p.add_argument("--workers", default="8", help="worker count; sim: a comma list sweeps sizes")
    p.add_argument("--worker-url", action="append", default=[], help="--fleet urls: worker URL")
    p.add_argument("--kv-blocks", type=int, default=320, help="KV blocks per worker")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument(
        "--policies",
        default="round_robin,prefix",
        help="kvroute policies and peers (vllm-router:P, smg:P, oracle, direct)",
    )
    p.add_argument(
        "--policy-options",
        default="{}",
        help='sim: JSON {policy: {option: value}}, e.g. {"prefix": {"load_weight": 0.5}}',
    )
    p.add_argument("--no-oracle", action="store_true")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop requests in flight")
    p.add_argument("--out", default="bench-out")
    p.add_argument("--log-level", default="WARNING")
    g = p.add_argument_group("simulator")
    g.add_argument(
        "--tokenization",
        choices=("words", "tiny"),
        default="words",
        help="sim token ids: cheap word ids or the tiny model's tokenizer",
    )
    g.add_argument(
        "--index-blocks",
        type=int,
        default=None,
        help="router index capacity per worker (default: --kv-blocks)",
    )
    g.add_argument(
        "--release-prefill",
        action="store_true",
        help="sim: drop a request's prefill from in-flight load at its first token "
        "(a proposed router change)",
    )
    g.add_argument(
        "--per-worker",
        action="store_true",
        help="sim: --requests, --groups, --concurrency and --rate are per worker (for sweeps)",
    )
    g.add_argument("--open-loop", action="store_true", help="sim: use trace arrival times")
    g.add_argument(
        "--router-port", type=int, default=8250, help="first port for routers (local/urls)"
    )
    g.add_argument("--worker-port", type=int, default=8201, help="first worker port (local)")
    g.add_argument(
        "--events-port",
        type=int,
        default=5701,
        help="local: first worker's KV-events port (replay endpoint: + 1000)",
    )
    g.add_argument(
        "--events-port-offset",
        type=int,
        default=None,
        help="urls: workers publish KV events on HTTP port + this (replay: + 1000); "
        "enables ?kv_events=1 routers",
    )
    g.add_argument("--tokenizer", default=None, help="urls: the model's tokenizer folder (exact mode)")
    add_workload_args(p)


def _routers(args: argparse.Namespace) -> list[str]:
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    if not args.no_oracle and "oracle" not in names:
        names.append("oracle")
    return names


def run_sim(args: argparse.Namespace, header: dict[str, Any]) -> dict[str, Any]:
    from kvroute.benchmarks.backends.routers import parse_router
    from kvroute.benchmarks.backends.sim import SimConfig, simulate
    from kvroute.benchmarks.backends.simkeys import KeyCache, make_tokenization
    from kvroute.benchmarks.report import write_report

    sizes = [int(x) for x in str(args.workers).split(",")]
    spec = workload_from_args(args)
    options = json.loads(args.policy_options)
    routers = _routers(args)
    tok = make_tokenization(args.tokenization)
    sweep = []
    scale = sizes if args.per_worker else [1] * len(sizes)
    bar = progress_bar(spec.requests * len(routers) * sum(scale), "sim")
    for n, k in zip(sizes, scale):
        sized = dataclasses.replace(
            spec, requests=spec.requests * k, groups=spec.groups * k, rate=spec.rate * k
        )
        cfg = SimConfig(
            workers=n,
            capacity_blocks=args.kv_blocks,
            block_size=args.block_size,
            index_capacity_blocks=args.index_blocks,
            concurrency=0 if args.open_loop else args.concurrency * k,
            seed=args.seed,
            model=args.model,
            release_prefill=args.release_prefill,
        )
        runs = []
        for name in routers:
            rspec = parse_router(name)
            if rspec.kind not in ("kvroute", "oracle"):
                raise SystemExit(f"{name}: the simulator runs kvroute policies and the oracle only")
            if not rspec.tokenizer:
                raise SystemExit(f"{name}: the simulator's token ids come from --tokenization; "
                                 "tokenizer=0 is for real routers")
            policy = rspec.policy or name
            opts = {**options.get(policy, {}), **rspec.policy_options}
            index_blocks = rspec.model_options.get("kv_capacity_blocks", args.index_blocks)
            keys = KeyCache(tok, args.block_size)
            started = time.perf_counter()
            run = simulate(
                iter_records(sized.with_nonce(name)),
                name,
                dataclasses.replace(cfg, index_capacity_blocks=index_blocks),
                keys,
                opts or None,
                bar.update,
                policy=policy,
                exact=rspec.kv_events,
                replicas=max(rspec.replicas, rspec.procs),  # --procs N: N independent views
            )
            run.extra["fleet_workers"] = n
            run.extra["requests"] = sized.requests
            run.extra["groups"] = sized.groups
            run.extra["sim_wall_s"] = round(time.perf_counter() - started, 2)
            runs.append(run)
        sweep.append((n, runs))
    bar.close()
    header["fleet"] = {
        "kind": "sim",
        "workers": sizes[-1],
        "kv_blocks": args.kv_blocks,
        "block_size": args.block_size,
        "tokenization": args.tokenization,
        "index_blocks": args.index_blocks or args.kv_blocks,
        "release_prefill": args.release_prefill,
        "loop": "open" if args.open_loop else f"closed, concurrency {args.concurrency}",
        "per_worker": args.per_worker,
    }
    return write_report(args.out, header, sweep[-1][1], sweep if len(sizes) > 1 else ())


def add_fleet_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``kvroute bench fleet``."""
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--kv-blocks", type=int, default=320)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--worker-port", type=int, default=8201)
    p.add_argument("--events-port", type=int, default=5701)
    p.add_argument("--model", default="tiny")
    p.add_argument("--out", default="bench-out/fleet")


def run_fleet(args: argparse.Namespace, argv: list[str]) -> int:
    """Start a local fleet and keep it until SIGTERM/Ctrl-C, so several runs can share it."""
    import signal

    from kvroute.benchmarks.backends.local import local_fleet

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with local_fleet(
        args.workers,
        args.kv_blocks,
        args.block_size,
        Path(args.out) / "logs",
        base_port=args.worker_port,
        events_port=args.events_port,
        model=args.model,
    ) as fleet:
        info = dataclasses.asdict(fleet)
        (Path(args.out) / "fleet.json").write_text(json.dumps(info, indent=2))
        print(json.dumps(info), flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def run_real(args: argparse.Namespace, header: dict[str, Any]) -> dict[str, Any]:
    from kvroute.benchmarks.backends.urls import RealFleet, compare_routers, urls_kv_events
    from kvroute.benchmarks.report import write_report

    spec = workload_from_args(args)
    routers = _routers(args)
    log_dir = Path(args.out) / "logs"
    bar = progress_bar(spec.requests * len(routers), args.fleet)
    if args.fleet == "urls":
        if not args.worker_url:
            raise SystemExit("--fleet urls needs --worker-url (repeat per worker)")
        fleet = RealFleet(
            tuple(args.worker_url),
            model=args.model,
            tokenizer=args.tokenizer,
            block_size=args.block_size,
            kv_events=urls_kv_events(args.events_port_offset),
        )
        runs = compare_routers(
            fleet, routers, spec, args.concurrency, log_dir, args.router_port, bar.update
        )
        header["fleet"] = {"kind": "urls", "workers": len(fleet.urls), "urls": list(fleet.urls),
                           "loop": _loop(args.concurrency, spec.rate)}
    else:
        from kvroute.benchmarks.backends.local import local_fleet

        n = int(args.workers)
        with local_fleet(
            n,
            args.kv_blocks,
            args.block_size,
            log_dir,
            base_port=args.worker_port,
            events_port=args.events_port,
            model=args.model,
        ) as fleet:
            runs = compare_routers(
                fleet, routers, spec, args.concurrency, log_dir, args.router_port, bar.update
            )
        header["fleet"] = {
            "kind": "local",
            "workers": n,
            "kv_blocks": args.kv_blocks,
            "block_size": args.block_size,
            "concurrency": args.concurrency,
            "loop": _loop(args.concurrency, spec.rate),
        }
    bar.close()
    return write_report(args.out, header, runs)


def _loop(concurrency: int, rate: float) -> str:
    """How a real-fleet run sent its requests (``drive``: concurrency 0 sends each at its time)."""
    if concurrency > 0:
        return f"closed, concurrency {concurrency}"
    return f"open, {rate:g} req/s" if rate > 0 else "open, all at once"


def router_code_digest() -> dict[str, str]:
    """Short content hashes of the router code a run measured (it changes between runs)."""
    from kvroute import router

    root = Path(router.__file__).parent
    files = sorted(root.glob("policies/*.py")) + [root / "index.py", root / "proxy.py"]
    h = xxhash.xxh64()
    for f in files:
        if f.exists():
            h.update(f.read_bytes())
    return {"path": str(root), "policies_index_proxy_xxh64": h.hexdigest()}


def add_trace_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``kvroute bench trace``, the workload's included."""
    add_workload_args(p)
    p.add_argument("--nonce", default="")
    p.add_argument("--out", required=True)


def run_trace(args: argparse.Namespace, argv: list[str]) -> int:
    """Write the workload as a JSONL trace (``--workload trace`` replays it)."""
    n = write_trace(iter_records(workload_from_args(args).with_nonce(args.nonce)), args.out)
    print(f"wrote {n} requests to {args.out}")
    return 0


def run_routing(args: argparse.Namespace, argv: list[str]) -> int:
    """The routing benchmark (``kvroute bench [run]``); ``argv``, its arguments without
    ``run``, is recorded as the command."""
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    spec = workload_from_args(args)
    header: dict[str, Any] = {
        "command": "kvroute bench " + shlex.join(argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "workload": spec.describe(),
        "seed": args.seed,
        "router_code": router_code_digest(),
    }
    doc = run_sim(args, header) if args.fleet == "sim" else run_real(args, header)
    print((Path(args.out) / "results.md").read_text())
    return 1 if any(e["errors"] for e in doc["routers"].values()) else 0


class Command(NamedTuple):
    """A ``kvroute bench`` subcommand: its flags and what runs it."""

    help: str  # one line in ``kvroute bench --help``
    description: str | None  # the top of ``kvroute bench NAME --help``
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, list[str]], int]  # (parsed flags, its own argv) -> exit code


COMMANDS: dict[str, Command] = {
    "run": Command(
        "compare routers on one request stream (the default command)",
        "Compare routers on the same request stream on a simulated (sim), local or given (urls) "
        "fleet and write results.json, results.md and plots to --out. The default command: "
        "kvroute bench --fleet sim ... runs it.",
        add_run_arguments,
        run_routing,
    ),
    "overhead": Command("what each router adds in front of a free upstream", overhead.__doc__,
                        overhead.add_arguments, overhead.run),
    "reliability": Command("load, faults, restarts: does the router hold up?", reliability.__doc__,
                           reliability.add_arguments, reliability.run),
    "cache": Command("what the response cache saves an agent workload, and costs", cache_bench.__doc__,
                     cache_bench.add_arguments, cache_bench.run),
    "trace": Command("write a workload as JSONL", "write a workload as JSONL", add_trace_arguments, run_trace),
    "fleet": Command("start a local fleet and hold it for several runs", run_fleet.__doc__,
                     add_fleet_arguments, run_fleet),
    "agreement": Command("would two exact-mode replicas pick the same worker?", agreement.__doc__,
                         agreement.add_arguments, agreement.run),
    "ceiling": Command("the most prefix-cache hits any router could get", ceiling.__doc__,
                       ceiling.add_arguments, ceiling.run),
    "hot-sweep": Command("one hot prefix at shares from 10%% to 80%% (simulator)", hot_sweep.__doc__,
                         hot_sweep.add_arguments, hot_sweep.run),
}


def build_parser() -> argparse.ArgumentParser:
    """``kvroute bench``: one subparser per command in ``COMMANDS``."""
    p = argparse.ArgumentParser(
        prog="kvroute bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    for name, command in COMMANDS.items():
        sp = sub.add_parser(
            name,
            help=command.help,
            description=command.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(sp)
        sp.set_defaults(handler=command.run)
    return p


def command_argv(argv: list[str]) -> list[str]:
    """``argv`` with its command first: ``DEFAULT_COMMAND`` is put in front when there is
    none (no arguments, or an option other than --help first)."""
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        return [DEFAULT_COMMAND, *argv]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = command_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    return args.handler(args, argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
