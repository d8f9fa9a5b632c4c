"""``kvroute bench``: run a routing benchmark and write its report.

    kvroute bench --fleet sim --workers 8,64,512 --workload shared-prefix --requests 5000 \\
        --policies round_robin,prefix --out DIR
    kvroute bench --fleet local --workers 4 --kv-blocks 320 --workload hot-prefix \\
        --policies prefix,round_robin,vllm-router:cache_aware,smg:cache_aware --out DIR
    kvroute bench --fleet urls --worker-url http://h:8000 --worker-url ... --policies ...
    kvroute bench overhead --out DIR
    kvroute bench trace --workload agent --requests 200 --out trace.jsonl
    kvroute bench fleet --workers 4 --kv-blocks 320 --worker-port 8260 --events-port 18260
    kvroute bench agreement --worker-url ... --events-port-offset 10000 --out DIR
    kvroute bench ceiling --workers 4 --kv-blocks 160 --workload shared-prefix --out DIR

The oracle (groups pinned to workers by hand) is added unless ``--no-oracle``, because
``hit_rate_vs_oracle`` needs it. Also runnable as ``python -m kvroute.benchmarks.cli``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import xxhash

from kvroute.benchmarks.workloads import WORKLOADS, WorkloadSpec, iter_records, write_trace


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=WORKLOADS, default="shared-prefix")
    g.add_argument("--trace", help="JSONL trace for --workload trace")
    g.add_argument("--requests", type=int, default=192)
    g.add_argument("--groups", type=int, default=16, help="prefix groups / concurrent sessions")
    g.add_argument("--prefix-tokens", type=int, default=1800)
    g.add_argument("--question-tokens", type=int, default=40)
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--hot-share", type=float, default=0.6)
    g.add_argument("--turns", type=int, default=8)
    g.add_argument("--rate", type=float, default=0.0, help="open-loop arrivals/s (0: closed loop)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--model", default="tiny", help="served model name")


def _spec(args: argparse.Namespace) -> WorkloadSpec:
    return WorkloadSpec(
        name=args.workload,
        seed=args.seed,
        requests=args.requests,
        groups=args.groups,
        prefix_tokens=args.prefix_tokens,
        question_tokens=args.question_tokens,
        max_tokens=args.max_tokens,
        rate=args.rate,
        model=args.model,
        hot_share=args.hot_share,
        turns=args.turns,
        trace_path=args.trace,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvroute bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    _add_workload_args(p)
    return p


def _routers(args: argparse.Namespace) -> list[str]:
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    if not args.no_oracle and "oracle" not in names:
        names.append("oracle")
    return names


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True)


def run_sim(args: argparse.Namespace, header: dict[str, Any]) -> dict[str, Any]:
    from kvroute.benchmarks.fleets.routers import parse_router
    from kvroute.benchmarks.fleets.sim import SimConfig, simulate
    from kvroute.benchmarks.fleets.simkeys import KeyCache, make_tokenization
    from kvroute.benchmarks.report import write_report

    sizes = [int(x) for x in str(args.workers).split(",")]
    spec = _spec(args)
    options = json.loads(args.policy_options)
    routers = _routers(args)
    tok = make_tokenization(args.tokenization)
    sweep = []
    scale = sizes if args.per_worker else [1] * len(sizes)
    bar = _progress(spec.requests * len(routers) * sum(scale), "sim")
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


def urls_kv_events(offset: int | None) -> dict | None:
    """The ``kv_events:`` config of a fleet whose events port is HTTP port + ``offset``."""
    if offset is None:
        return None
    from kvroute.router.fleet.local import REPLAY_PORT_OFFSET

    return {"port_offset": offset, "replay_port_offset": offset + REPLAY_PORT_OFFSET}


def hold_fleet_main(argv: list[str]) -> int:
    """Start a local fleet and keep it until SIGTERM/Ctrl-C, so several runs can share it."""
    import signal

    from kvroute.benchmarks.fleets.local import local_fleet

    p = argparse.ArgumentParser(prog="kvroute bench fleet", description=hold_fleet_main.__doc__)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--kv-blocks", type=int, default=320)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--worker-port", type=int, default=8201)
    p.add_argument("--events-port", type=int, default=5701)
    p.add_argument("--model", default="tiny")
    p.add_argument("--out", default="bench-out/fleet")
    args = p.parse_args(argv)
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
    from kvroute.benchmarks.fleets.urls import RealFleet, compare_routers
    from kvroute.benchmarks.report import write_report

    spec = _spec(args)
    routers = _routers(args)
    log_dir = Path(args.out) / "logs"
    bar = _progress(spec.requests * len(routers), args.fleet)
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
        header["fleet"] = {"kind": "urls", "workers": len(fleet.urls), "urls": list(fleet.urls)}
    else:
        from kvroute.benchmarks.fleets.local import local_fleet

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
        }
    bar.close()
    return write_report(args.out, header, runs)


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


def write_trace_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvroute bench trace", description="write a workload as JSONL")
    _add_workload_args(p)
    p.add_argument("--nonce", default="")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    n = write_trace(iter_records(_spec(args).with_nonce(args.nonce)), args.out)
    print(f"wrote {n} requests to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["overhead"]:
        from kvroute.benchmarks.overhead import main as overhead_main

        return overhead_main(argv[1:])
    if argv[:1] == ["trace"]:
        return write_trace_main(argv[1:])
    if argv[:1] == ["fleet"]:
        return hold_fleet_main(argv[1:])
    if argv[:1] == ["ceiling"]:
        from kvroute.benchmarks.ceiling import main as ceiling_main

        return ceiling_main(argv[1:])
    if argv[:1] == ["agreement"]:
        from kvroute.benchmarks.agreement import main as agreement_main

        return agreement_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    spec = _spec(args)
    header: dict[str, Any] = {
        "command": "kvroute bench " + shlex.join(argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "workload": {k: v for k, v in vars(spec).items() if k not in ("extra", "nonce")},
        "seed": args.seed,
        "router_code": router_code_digest(),
    }
    doc = run_sim(args, header) if args.fleet == "sim" else run_real(args, header)
    print((Path(args.out) / "results.md").read_text())
    return 1 if any(e["errors"] for e in doc["routers"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
