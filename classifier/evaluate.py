"""Evaluation on held-out data: RouteLLM metrics per task, baselines, report files.

Each task is measured on its own (qualities on different scales must not be pooled):
the model, the random router (same code, random scores) and the oracle.  The top-level
figures in ``results.json`` are the macro average over tasks; ``per_task`` has the rest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kvroute.classifier.data import Record
from kvroute.classifier.metrics import operating_point, oracle, random_baseline, summarize

KEYS = ("apgr", "cpt50", "cpt80", "strong_share_for_95")


def score_all(scorer: object, prompts: Sequence[str], chunk: int = 256) -> list[float]:
    """``scorer.score`` over ``prompts`` in chunks, with a progress bar."""
    out: list[float] = []
    for start in tqdm(range(0, len(prompts), chunk), desc="scoring", unit="chunk", leave=False):
        out.extend(scorer.score(list(prompts[start : start + chunk])))  # type: ignore[attr-defined]
    return out


def evaluate_scores(scores: Sequence[float], records: Sequence[Record], strong: str, weak: str,
                    threshold: float | None = None) -> dict:
    """Metrics for precomputed scores, per task and macro-averaged."""
    if not records:
        raise ValueError("nothing to evaluate: no records with both models' scores")
    s = np.asarray(scores, dtype=float)
    per_task: dict[str, dict] = {}
    for task in sorted({r.task for r in records}):
        idx = [i for i, r in enumerate(records) if r.task == task]
        sq = [records[i].scores[strong] for i in idx]
        wq = [records[i].scores[weak] for i in idx]
        res = summarize(s[idx], sq, wq)
        res["random"] = random_baseline(sq, wq)
        res["oracle"] = oracle(sq, wq)
        if threshold is not None:
            res["at_threshold"] = operating_point(s[idx], threshold, sq, wq)
        per_task[task] = res
    out: dict = {k: _macro([t[k] for t in per_task.values()]) for k in KEYS}
    out["n_prompts"] = len(records)
    out["random"] = {k: _macro([t["random"][k] for t in per_task.values()]) for k in KEYS}
    out["oracle"] = {k: _macro([t["oracle"][k] for t in per_task.values()]) for k in KEYS}
    out["per_task"] = per_task
    return out


def evaluate(scorer: object, records: Sequence[Record], strong: str, weak: str) -> dict:
    scores = score_all(scorer, [r.prompt for r in records])
    res = evaluate_scores(scores, records, strong, weak, getattr(scorer, "threshold", None))
    res["model_version"] = getattr(scorer, "version", "")
    return res


def compare(live: object, candidate: object, records: Sequence[Record], strong: str,
            weak: str) -> dict:
    """A candidate against the live model on the same records: both models' metrics and
    how often their routing decisions (each at its own threshold) agree.

    What shadow mode (``classifier.shadow``) measures on live traffic, offline.
    """
    prompts = [r.prompt for r in records]
    a = np.asarray(score_all(live, prompts))
    b = np.asarray(score_all(candidate, prompts))
    ta, tb = float(live.threshold), float(candidate.threshold)  # type: ignore[attr-defined]
    cand = evaluate_scores(b, records, strong, weak, tb)
    sa, sb = a >= ta, b >= tb
    return {"candidate_version": getattr(candidate, "version", ""),
            "candidate": {k: cand[k] for k in KEYS},
            "candidate_per_task_apgr": {t: r["apgr"] for t, r in cand["per_task"].items()},
            "agreement": float((sa == sb).mean()),
            "live_strong_share": float(sa.mean()), "candidate_strong_share": float(sb.mean()),
            "rank_correlation": _spearman(a, b)}


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    c = np.corrcoef(ra, rb)[0, 1]
    return None if np.isnan(c) else float(c)


def _macro(values: list[float | None]) -> float | None:
    return float(np.mean(values)) if values and None not in values else None


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:.0%}" if pct else f"{v:.3f}"


def markdown(results: dict) -> str:
    """A table: one row per task and router (model, random, oracle)."""
    lines = ["| task | router | n | APGR | CPT(50%) | CPT(80%) | strong share for 95% |",
             "|---|---|---|---|---|---|---|"]
    for task, res in results["per_task"].items():
        for name, r in (("model", res), ("random", res["random"]), ("oracle", res["oracle"])):
            lines.append(f"| {task} | {name} | {res['n_prompts']} | {_fmt(r['apgr'])} | "
                         f"{_fmt(r['cpt50'], True)} | {_fmt(r['cpt80'], True)} | "
                         f"{_fmt(r['strong_share_for_95'], True)} |")
    op = [(t, r["at_threshold"]) for t, r in results["per_task"].items() if "at_threshold" in r]
    if op:
        lines += ["", "At the calibrated threshold:", "",
                  "| task | threshold | strong share | quality |", "|---|---|---|---|"]
        lines += [f"| {t} | {o['threshold']:.4f} | {o['strong_share']:.1%} | {o['quality']:.3f} |"
                  for t, o in op]
    cmp = results.get("compare")
    if cmp:
        c = cmp["candidate"]
        lines += ["", f"Candidate {cmp['candidate_version']} on the same rows:", "",
                  "| router | APGR | CPT(50%) | strong share at its threshold |", "|---|---|---|---|",
                  f"| live | {_fmt(results['apgr'])} | {_fmt(results['cpt50'], True)} | "
                  f"{cmp['live_strong_share']:.1%} |",
                  f"| candidate | {_fmt(c['apgr'])} | {_fmt(c['cpt50'], True)} | "
                  f"{cmp['candidate_strong_share']:.1%} |", "",
                  f"Decisions agree on {cmp['agreement']:.1%} of rows; rank correlation "
                  f"{_fmt(cmp['rank_correlation'])}."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Quality vs strong-call share per task, with random router and oracle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["per_task"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        res = results["per_task"][task]
        for name, r, style in (("classifier", res, "o-"), ("random", res["random"], "--"),
                               ("oracle", res["oracle"], ":")):
            ax.plot(r["curve"]["strong_share"], r["curve"]["quality"], style,
                    label=f"{name} (APGR {r['apgr']:.2f})")
        ax.axhline(res["strong_quality"], color="grey", lw=0.6)
        ax.axhline(res["weak_quality"], color="grey", lw=0.6)
        ax.set(title=f"{task} (n={res['n_prompts']})", xlabel="share of calls to strong model",
               ylabel="quality")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out: str | Path) -> Path:
    """results.json, results.md and curve.png in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "curve.png")
    return out
