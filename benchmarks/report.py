"""Write a benchmark's ``results.json``, ``results.md`` and PNG plots into one folder.

``results.json`` holds the run's context (command, workload, fleet, seed) and, under
``routers``, one entry per router (see ``benchmarks.results.summarize``). A simulated
sweep over fleet sizes adds ``sweep``: the same entries per fleet size, the last size
being the one ``routers`` shows. Plots use matplotlib's Agg backend (no display):
hit rate by router, TTFT CDF, per-worker load and, for sweeps, hit rate and decision
time against fleet size.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvroute.benchmarks.results import RouterRun, summarize

ORACLE = "oracle"


def build_results(
    runs: Sequence[RouterRun], context: dict[str, Any], oracle_name: str = ORACLE
) -> dict[str, dict[str, Any]]:
    """Summaries keyed by router; hit_rate_vs_oracle uses the run named ``oracle_name``."""
    oracle = next((r for r in runs if r.router == oracle_name), None)
    oracle_rate = oracle.hit_rate if oracle is not None else None
    return {r.router: summarize(r, oracle_rate, context) for r in runs}


def write_report(
    out: str | Path,
    header: dict[str, Any],
    runs: Sequence[RouterRun],
    sweep: Sequence[tuple[int, Sequence[RouterRun]]] = (),
) -> dict[str, Any]:
    """Write results.json, results.md and plots; returns the results document."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    context = {k: header[k] for k in ("workload", "fleet", "seed") if k in header}
    doc: dict[str, Any] = {**header, "routers": build_results(runs, context)}
    if sweep:
        doc["sweep"] = [
            {
                "workers": n,
                "routers": build_results(
                    rs, {**context, "fleet": {**context.get("fleet", {}), "workers": n}}
                ),
            }
            for n, rs in sweep
        ]
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out / "results.md").write_text(render_markdown(doc))
    write_plots(out, doc, runs)
    return doc


_COLUMNS = [
    ("router", "router", "{}"),
    ("hit_rate", "hit rate", "{:.3f}"),
    ("hit_rate_vs_oracle", "vs oracle", "{:.2f}"),
    ("max_share_over_fair", "max share / fair", "{:.2f}"),
    ("ttft_p50_s", "TTFT p50 (s)", "{:.3f}"),
    ("ttft_p99_s", "TTFT p99 (s)", "{:.3f}"),
    ("throughput_rps", "req/s", "{:.1f}"),
    ("errors", "errors", "{}"),
]
_SIM_COLUMNS = [
    ("decision_us_p50", "decide p50 (µs)", "{:.1f}"),
    ("decision_us_p99", "decide p99 (µs)", "{:.1f}"),
    ("index_bytes_approx", "index MB", None),
]


def _cell(value: Any, fmt: str | None, key: str) -> str:
    if value is None:
        return "–"
    if key == "index_bytes_approx":
        return f"{value / 1e6:.2f}"
    return fmt.format(value) if fmt else str(value)


_ADDED_COLUMN = ("router_added_ms_p50", "in kvroute p50 (ms)", "{:.2f}")


def _table(entries: dict[str, dict[str, Any]]) -> list[str]:
    cols = list(_COLUMNS)
    if any(e.get("router_added_ms_p50") is not None for e in entries.values()):
        cols.insert(next(i for i, c in enumerate(cols) if c[0] == "ttft_p99_s") + 1, _ADDED_COLUMN)
    if any("decision_us_p50" in e for e in entries.values()):
        cols += _SIM_COLUMNS
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for e in entries.values():
        lines.append("| " + " | ".join(_cell(e.get(k), f, k) for k, _, f in cols) + " |")
    return lines


def render_markdown(doc: dict[str, Any]) -> str:
    wl = doc.get("workload", {})
    fleet = doc.get("fleet", {})
    lines = [
        f"# Routing benchmark: {wl.get('name', '?')} on {fleet.get('kind', '?')} fleet",
        "",
        f"- command: `{doc.get('command', '')}`",
        f"- workload: {json.dumps(wl, default=str)}",
        f"- fleet: {json.dumps(fleet, default=str)}",
        f"- seed: {doc.get('seed')}",
        "",
    ]
    if doc.get("sweep"):
        for part in doc["sweep"]:
            lines += [f"## {part['workers']} workers", "", *_table(part["routers"]), ""]
    else:
        lines += _table(doc["routers"]) + [""]
    lines += [
        "Hit rate: vLLM prefix-cache hit tokens / query tokens over all workers. "
        "vs oracle: hit rate / the hand-pinned oracle's. max share / fair: busiest worker's "
        "request share × workers."
        + (" in kvroute: the time a request spent in kvroute itself, from its arrival to the "
           "call to the worker plus from the worker's first event to the client's (its "
           "kvroute_router_added_seconds metric); the rest of the TTFT is the worker's, the "
           "network's and the wait for a core." if _has_added(doc) else ""),
        "",
    ]
    return "\n".join(lines)


def _has_added(doc: dict[str, Any]) -> bool:
    parts = [p["routers"] for p in doc.get("sweep") or ()] or [doc["routers"]]
    return any(e.get("router_added_ms_p50") is not None for entries in parts for e in entries.values())


def write_plots(out: Path, doc: dict[str, Any], runs: Sequence[RouterRun]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    entries = doc["routers"]
    names = list(entries)

    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names)), 3.5))
    ax.bar(names, [entries[n]["hit_rate"] or 0 for n in names], color="tab:blue")
    ax.set_ylabel("prefix-cache hit rate")
    ax.set_ylim(0, 1)
    ax.set_title("Hit rate by router")
    ax.tick_params(axis="x", rotation=30)
    paths.append(_save(fig, out / "hit_rate.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in runs:
        if r.ttft_s:
            xs = sorted(r.ttft_s)
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=r.router)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    paths.append(_save(fig, out / "ttft_cdf.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(1, len(runs))
    for j, r in enumerate(runs):
        xs = [i + j * width for i in range(len(r.per_worker_requests))]
        ax.bar(xs, r.per_worker_requests, width=width, label=r.router)
    ax.set_xlabel("worker")
    ax.set_ylabel("requests")
    ax.set_title("Per-worker load")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    paths.append(_save(fig, out / "worker_load.png"))

    sweep = doc.get("sweep") or []
    if len(sweep) > 1:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        routers = list(sweep[0]["routers"])
        sizes = [p["workers"] for p in sweep]
        for name in routers:
            a1.plot(sizes, [p["routers"][name]["hit_rate"] for p in sweep], marker="o", label=name)
            dec = [p["routers"][name].get("decision_us_p50") for p in sweep]
            if name != ORACLE and all(d is not None for d in dec):
                a2.plot(sizes, dec, marker="o", label=name)
        for a in (a1, a2):
            a.set_xscale("log", base=2)
            a.set_xlabel("workers")
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=7)
        a1.set_ylabel("hit rate")
        a1.set_ylim(0, 1)
        a2.set_ylabel("decision time p50 (µs)")
        fig.suptitle("Simulated fleet size sweep")
        paths.append(_save(fig, out / "scaling.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
