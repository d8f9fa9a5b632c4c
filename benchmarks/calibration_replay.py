"""Replay a stream whose task family switches, and watch the strong-tier share.

``python -m kvroute.benchmarks.calibration_replay --out DIR [--plot docs/calibration_replay.png]``

The tier classifier (default: the shipped artifact) scores RouteLLM prompts; the stream
runs one task family after another (MMLU humanities, GSM8K, MMLU STEM, MT-Bench, MMLU
other, GSM8K again), each shuffled with a fixed seed. Two routers replay it in batches of
``--batch`` prompts, as the router's batching does: the artifact's static threshold, and
the online threshold of ``router/calibration.py`` at the target share. The report gives
the strong share in consecutive blocks of ``--block`` requests, the worst block's
distance from the target (after the first block, which holds the warm-up), the quality
each router reaches on the 0/1-scored requests, and writes ``replay.json`` plus a plot.

It also replays a scale-out: ``--replicas`` replicas share the stream, the last one
starting as the second GSM8K run begins, with thresholds held per replica and with one
shared threshold (``classifier.online.shared``).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from kvroute.router.calibration import OnlineThreshold
from kvroute.router.config import OnlineCalibrationConfig

# (label, LOTO unit, how many prompts); units as in classifier/loto.py
SEGMENTS = (("MMLU humanities", "mmlu:humanities", 2500), ("GSM8K", "gsm8k", 1300),
            ("MMLU STEM", "mmlu:stem", 2500), ("MT-Bench", "mt_bench", 144),
            ("MMLU other", "mmlu:other", 2500), ("GSM8K again", "gsm8k", 1300))


def build_stream(seed: int = 0) -> tuple[list, list[tuple[str, int]]]:
    """Records in family order, and (label, start index) of each family."""
    from kvroute.classifier.data import load_routellm
    from kvroute.classifier.loto import unit_of

    by_unit: dict[str, list] = {}
    for r in load_routellm():
        by_unit.setdefault(unit_of(r), []).append(r)
    rng = random.Random(seed)
    stream: list = []
    starts: list[tuple[str, int]] = []
    for label, unit, n in SEGMENTS:
        pool = list(by_unit[unit])
        rng.shuffle(pool)
        starts.append((label, len(stream)))
        stream.extend(pool[:n])
    return stream, starts


def quality(strong: np.ndarray, records: list, starts: list[tuple[str, int]], scores: np.ndarray,
            target: float) -> dict:
    """Mean 0/1 quality on the MMLU and GSM8K requests (MT-Bench is graded 1-10, left out)
    of each router, and of two references: each family cut at its own score quantile
    (a router told when the family switches) and random routing at the target share."""
    from kvroute.classifier.data import ROUTELLM_STRONG, ROUTELLM_WEAK

    sq = np.array([r.scores[ROUTELLM_STRONG] for r in records])
    wq = np.array([r.scores[ROUTELLM_WEAK] for r in records])
    binary = np.array([r.task != "mt_bench" for r in records])
    bounds = [s for _, s in starts] + [len(records)]
    per_family = np.zeros(len(records), dtype=bool)
    for a, b in zip(bounds, bounds[1:]):
        per_family[a:b] = scores[a:b] >= np.quantile(scores[a:b], 1 - target)
    rand = np.random.default_rng(0).random(len(records)) < target

    def q(sent: np.ndarray) -> float:
        return float(np.where(sent, sq, wq)[binary].mean())

    return {"static": q(strong["static"]), "online": q(strong["online"]),
            "per_family_quantile": q(per_family), "random": q(rand)}


def replay(scores: np.ndarray, static_threshold: float, cfg: OnlineCalibrationConfig,
           batch: int = 8) -> dict:
    """Per-request decisions and thresholds of the static and the online router."""
    online = OnlineThreshold(cfg, static_threshold)
    strong = np.zeros(len(scores), dtype=bool)
    thresholds = np.zeros(len(scores))
    for start in range(0, len(scores), batch):
        chunk = scores[start : start + batch]
        thresholds[start : start + len(chunk)] = online.threshold
        strong[start : start + len(chunk)] = chunk >= online.threshold
        online.observe(chunk.tolist())
    return {"online_strong": strong, "online_threshold": thresholds,
            "static_strong": scores >= static_threshold}


def replay_fleet(scores: np.ndarray, static_threshold: float, cfg: OnlineCalibrationConfig, *, replicas: int,
                 join_at: int, shared: bool, sync_every: int = 1, batch: int = 8) -> dict:
    """Requests spread round-robin over ``replicas - 1`` replicas, and over all of them from
    request ``join_at`` on, when one more starts at the artifact's threshold (a scale-out).
    ``shared``: every ``sync_every`` batches a replica adds its moves to one shared logit
    and routes at it, as ``SharedThreshold`` does through Redis (the same arithmetic, kept
    in memory here)."""
    online = [OnlineThreshold(cfg, static_threshold) for _ in range(replicas)]
    lo, hi = online[0].bounds
    common: float | None = None
    strong = np.zeros(len(scores), dtype=bool)
    served_by = np.zeros(len(scores), dtype=int)
    batches = [0] * replicas
    # each replica routes whole batches: batch b of the stream goes to one replica
    for b, start in enumerate(range(0, len(scores), batch)):
        live = replicas if start >= join_at else replicas - 1
        r = b % live
        o = online[r]
        if shared and batches[r] % sync_every == 0:
            common = min(max((o.initial_logit if common is None else common) + o.take_pending(), lo), hi)
            o.adopt(common)
        chunk = scores[start : start + batch]
        strong[start : start + len(chunk)] = chunk >= o.threshold
        served_by[start : start + len(chunk)] = r
        o.observe(chunk.tolist())
        batches[r] += 1
    return {"strong": strong, "served_by": served_by}


def scale_out(scores: np.ndarray, static_threshold: float, cfg: OnlineCalibrationConfig, replicas: int,
              join_at: int, batch: int, first: int = 200) -> dict:
    """The strong share of the fleet after ``join_at``, and of the new replica's first
    ``first`` requests, with each replica alone and with the shared threshold."""
    out = {}
    for name, shared in (("alone", False), ("shared", True)):
        res = replay_fleet(scores, static_threshold, cfg, replicas=replicas, join_at=join_at, shared=shared,
                           batch=batch)
        new = np.flatnonzero(res["served_by"] == replicas - 1)[:first]
        after = res["strong"][join_at : join_at + 4 * first]
        out[name] = {"new_replica_first_requests_share": float(res["strong"][new].mean()),
                     "fleet_share_after_join": float(after.mean()),
                     "overall_share": float(res["strong"].mean())}
    out.update(replicas=replicas, join_at=join_at, first=first)
    return out


def blocks(strong: np.ndarray, size: int) -> list[float]:
    return [float(strong[i : i + size].mean()) for i in range(0, len(strong) - size + 1, size)]


def summarise(res: dict, target: float, block: int) -> dict:
    out = {}
    for name in ("static", "online"):
        b = blocks(res[f"{name}_strong"], block)
        dev = [abs(x - target) for x in b[1:]]  # the first block holds the warm-up
        out[name] = {"overall_share": float(res[f"{name}_strong"].mean()), "block_shares": b,
                     "max_block_deviation": max(dev), "blocks_within_3_points": sum(d <= 0.03 for d in dev),
                     "blocks": len(dev)}
    return out


def plot(res: dict, starts: list[tuple[str, int]], target: float, window: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True,
                                  gridspec_kw={"height_ratios": [2, 1]})
    kernel = np.ones(window) / window
    for name, style in (("static", "--"), ("online", "-")):
        roll = np.convolve(res[f"{name}_strong"].astype(float), kernel, mode="valid")
        ax.plot(np.arange(window - 1, window - 1 + len(roll)), roll, style,
                label=f"{name} threshold")
    ax.axhspan(target - 0.03, target + 0.03, color="green", alpha=0.15, label="target ± 3 points")
    ax.axhline(target, color="green", lw=0.8)
    ax2.plot(res["online_threshold"], label="online threshold")
    ax2.axhline(res["static_threshold"], ls="--", color="grey", label="artifact threshold")
    for a in (ax, ax2):
        for _, start in starts:
            a.axvline(start, color="black", lw=0.5, alpha=0.5)
    for i, (label, start) in enumerate(starts):
        ax.text(start + 20, 0.97 - 0.05 * (i % 2), label, fontsize=7, va="top")
    ax.set(ylabel=f"strong share (last {window} requests)", ylim=(0, 1),
           title="Strong-tier share on a stream that switches task family")
    ax2.set(xlabel="request", ylabel="threshold")
    ax.legend(fontsize=8, loc="center right")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="classifier artifact (default: shipped)")
    p.add_argument("--target", type=float, default=0.3)
    p.add_argument("--step", type=float, default=OnlineCalibrationConfig(0.3).step)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="embedding cache dir (offline runs)")
    p.add_argument("--out", required=True)
    p.add_argument("--plot", default=None, help="also write the plot here (e.g. docs/...png)")
    p.add_argument("--replicas", type=int, default=4,
                   help="scale-out check: this many replicas, the last one joining at the second GSM8K run")
    args = p.parse_args(argv)

    from kvroute.classifier.evaluate import score_all
    from kvroute.classifier.model import load_scorer

    scorer = load_scorer(args.model, cache_dir=args.cache)
    records, starts = build_stream(args.seed)
    scores = np.asarray(score_all(scorer, [r.prompt for r in records]))
    cfg = OnlineCalibrationConfig(args.target, step=args.step)
    res = replay(scores, float(scorer.threshold), cfg, args.batch)
    res["static_threshold"] = float(scorer.threshold)
    summary = {"model_version": scorer.version, "n_requests": len(scores), "target": args.target,
               "block": args.block, "batch": args.batch, "families": starts,
               "config": vars(cfg), **summarise(res, args.target, args.block),
               "quality_binary_tasks": quality({"static": res["static_strong"], "online": res["online_strong"]},
                                               records, starts, scores, args.target)}
    join_at = starts[-1][1]  # the new replica joins as the (hard) GSM8K traffic returns
    summary["scale_out"] = scale_out(scores, float(scorer.threshold), cfg, args.replicas, join_at, args.batch)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(res, starts, args.target, args.block, out / "replay.png")
    if args.plot:
        plot(res, starts, args.target, args.block, Path(args.plot))
    for name in ("static", "online"):
        s = summary[name]
        print(f"{name}: overall {s['overall_share']:.3f}, worst {args.block}-request block "
              f"{s['max_block_deviation']:.3f} from target, {s['blocks_within_3_points']}/{s['blocks']} "
              "blocks within 3 points")
    print("quality (MMLU + GSM8K requests):", json.dumps(summary["quality_binary_tasks"]))
    so = summary["scale_out"]
    for name in ("alone", "shared"):
        print(f"scale-out to {so['replicas']} replicas, thresholds {name}: the new replica's first {so['first']} "
              f"requests {so[name]['new_replica_first_requests_share']:.3f} strong, the fleet's next "
              f"{4 * so['first']} {so[name]['fleet_share_after_join']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
