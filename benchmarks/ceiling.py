"""``kvroute bench ceiling``: the most prefix-cache hits any router could get on a workload.

Pool every worker's KV cache into one cache of their total size. A request hits only
blocks its own worker holds, and whatever the workers hold together fits in the pooled
cache, so no router beats the pooled cache run with the best possible eviction:
- ``opt``: Belady's rule, evict the block whose next use is furthest away. It reads the
  future, so it bounds every router from above (an online one cannot know the future).
- ``lru``: least recently used, tail blocks first as vLLM frees them; the fleet's rate
  if it behaved as one big cache and every request found its prefix wherever it was.

Hits are counted like vLLM's ``prefix_cache_hits``: the longest cached prefix in blocks,
leaving at least one prompt token to compute. Blocks of running requests are not held
back and generated tokens are not cached, so the real ceiling is lower still.

    kvroute bench ceiling --workers 4 --kv-blocks 160 --workload shared-prefix \\
        --requests 288 --groups 24 --out DIR
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Sequence
from pathlib import Path

from kvroute.benchmarks.backends.simkeys import KeyCache, make_tokenization
from kvroute.benchmarks.runner import run_standalone
from kvroute.benchmarks.workloads import TraceRecord, add_workload_args, iter_records, workload_from_args

Request = tuple[tuple[int, ...], int]  # (block keys, prompt tokens)
NEVER = sys.maxsize


def request_keys(records: Iterable[TraceRecord], keys: KeyCache,
                 progress: Callable[[int], object] | None = None) -> list[Request]:
    """Block keys and prompt length of each record, in arrival order."""
    out = []
    for rec in records:
        out.append(keys.keys(rec.body["messages"]))
        if progress is not None:
            progress(1)
    return out


def _hit_tokens(keys: tuple[int, ...], prompt_tokens: int, cache: Container[int],
                block_size: int) -> int:
    """Tokens of the longest cached prefix, leaving one prompt token to compute (as vLLM)."""
    cached = 0
    while cached < len(keys) and keys[cached] in cache:
        cached += 1
    return min(cached, (prompt_tokens - 1) // block_size) * block_size


def lru_hits(reqs: Sequence[Request], capacity: int, block_size: int) -> int:
    """Prompt tokens found cached by one LRU cache of ``capacity`` blocks."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for keys, n in reqs:
        hits += _hit_tokens(keys, n, cache, block_size)
        for k in reversed(keys):  # the head ends most recent: the tail is evicted first
            cache[k] = None
            cache.move_to_end(k)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return hits


def opt_hits(reqs: Sequence[Request], capacity: int, block_size: int) -> int:
    """Prompt tokens found cached by Belady's optimal eviction on ``capacity`` blocks.

    A block is needed again whenever a later prompt contains it, so a block's next use is
    never later than its children's; breaking ties deepest first keeps the cache
    prefix-closed, and its block hits are then prefix hits.
    """
    next_use: list[list[int]] = [[] for _ in reqs]
    last: dict[int, int] = {}
    for t in range(len(reqs) - 1, -1, -1):
        keys = reqs[t][0]
        next_use[t] = [last.get(k, NEVER) for k in keys]
        for k in keys:
            last[k] = t
    cache: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int, int]] = []  # (-next use, -depth, key); stale rows skipped
    hits = 0
    for t, (keys, n) in enumerate(reqs):
        hits += _hit_tokens(keys, n, cache, block_size)
        for depth, (k, nu) in enumerate(zip(keys, next_use[t])):
            cache[k] = nu
            heapq.heappush(heap, (-nu, -depth, k))
        while len(cache) > capacity:
            neg_nu, _, k = heapq.heappop(heap)
            if cache.get(k) == -neg_nu:
                del cache[k]
        if len(heap) > 4 * capacity + 1024:  # drop stale rows now and then
            heap = [row for row in heap if cache.get(row[2]) == -row[0]]
            heapq.heapify(heap)
    return hits


def ceiling(reqs: Sequence[Request], capacity: int, block_size: int) -> dict[str, float]:
    queries = sum(n for _, n in reqs)
    blocks = len({k for keys, _ in reqs for k in keys})
    return {
        "capacity_blocks": capacity,
        "distinct_blocks": blocks,
        "capacity_over_blocks": round(capacity / blocks, 3) if blocks else 0.0,
        "prompt_tokens": queries,
        "opt_hit_rate": round(opt_hits(reqs, capacity, block_size) / queries, 4),
        "lru_hit_rate": round(lru_hits(reqs, capacity, block_size) / queries, 4),
    }


def _plot(path: Path, curve: list[dict], at: int, measured: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [c["capacity_blocks"] for c in curve]
    ax.plot(xs, [c["opt_hit_rate"] for c in curve], marker="o", label="optimal (Belady, offline)")
    ax.plot(xs, [c["lru_hit_rate"] for c in curve], marker="s", label="one LRU cache")
    ax.axvline(at, color="grey", linestyle="--", label=f"this fleet: {at} blocks")
    for i, (name, rate) in enumerate(sorted(measured.items(), key=lambda kv: -kv[1])):
        ax.plot([at], [rate], marker="x", markersize=8, linestyle="none", color=f"C{i + 2}",
                label=f"{name}: {rate:.3f}")
    ax.set_xlabel("fleet KV cache (blocks, all workers)")
    ax.set_ylabel("prefix-cache hit rate")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("Hit-rate ceiling of the pooled cache")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``kvroute bench ceiling``, the workload's included."""
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--kv-blocks", type=int, default=320, help="KV blocks per worker")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--tokenization", choices=("words", "tiny"), default="tiny")
    p.add_argument("--nonce", default="ceiling", help="prefix tag (any: it changes no length)")
    p.add_argument("--results", help="a bench run's results.json: put its routers on the plot")
    p.add_argument("--out", required=True)
    add_workload_args(p)


def main(argv: list[str] | None = None) -> int:
    """``kvroute bench ceiling`` on its own (``argv``: the arguments after ``ceiling``)."""
    return run_standalone("ceiling", __doc__, add_arguments, run, argv)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``kvroute bench ceiling`` with parsed ``args``; ``argv`` is recorded as the command.

    Bad input (sizes, a results file, a trace) ends it as argparse does: usage and exit 2.
    """
    from kvroute.benchmarks.runner import progress_bar, standalone_parser

    error = standalone_parser("ceiling", __doc__, add_arguments).error
    if args.workers < 1 or args.kv_blocks < 1:
        error("--workers and --kv-blocks must be positive")
    spec = workload_from_args(args)
    measured = {}
    if args.results:
        try:
            routers = json.loads(Path(args.results).read_text())["routers"]
            measured = {name: float(r["hit_rate"]) for name, r in routers.items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            error(f"--results {args.results}: not a bench results.json ({exc})")
    keys = KeyCache(make_tokenization(args.tokenization), args.block_size)
    try:
        with progress_bar(spec.requests, "ceiling") as bar:
            reqs = request_keys(iter_records(spec.with_nonce(args.nonce)), keys, bar.update)
    except (OSError, ValueError, KeyError) as exc:  # a missing or malformed trace
        error(f"--workload {spec.name}: {exc}")
    if not reqs:
        error("the workload has no requests")
    total = args.workers * args.kv_blocks
    curve = [ceiling(reqs, max(1, round(total * f)), args.block_size)
             for f in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)]
    result = next(c for c in curve if c["capacity_blocks"] == total)
    doc = {
        "command": "kvroute bench ceiling " + " ".join(argv),
        "workload": spec.describe(),
        "fleet": {"workers": args.workers, "kv_blocks": args.kv_blocks,
                  "block_size": args.block_size, "tokenization": args.tokenization},
        "requests": len(reqs),
        "ceiling": result,
        "curve": curve,
        "measured": measured,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ceiling.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = [
        f"`{doc['command']}`",
        "",
        "| fleet cache (blocks) | share of the workload's distinct blocks | optimal | one LRU cache |",
        "|---:|---:|---:|---:|",
    ]
    for c in curve:
        mark = " (this fleet)" if c["capacity_blocks"] == total else ""
        md.append(f"| {c['capacity_blocks']}{mark} | {c['capacity_over_blocks']:.2f} | "
                  f"{c['opt_hit_rate']:.3f} | {c['lru_hit_rate']:.3f} |")
    if measured:
        md += ["", "| router (from --results) | hit rate | of the optimum | of one LRU cache |",
               "|---|---:|---:|---:|"]
        for name, rate in sorted(measured.items(), key=lambda kv: -kv[1]):
            md.append(f"| {name} | {rate:.3f} | {rate / result['opt_hit_rate']:.2f} | "
                      f"{rate / result['lru_hit_rate']:.2f} |")
    (out / "ceiling.md").write_text("\n".join(md) + "\n")
    _plot(out / "ceiling.png", curve, total, measured)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
