"""Quality vs strong-tier cost on held-out GSM8K: classifier, cascade, both, and baselines.

Strategies (cost = share of prompts that call the strong tier; a cascade also calls the
cheap tier for every prompt it does not send straight to the strong one):

- cheap only, strong only, oracle (knows which prompts only the strong model gets right);
- classifier alone: the top-k prompts by the tier classifier's score go to the strong tier;
- cascade alone: every prompt tries the cheap tier; the k answers with the lowest answer
  scorer confidence escalate;
- classifier + cascade: prompts scoring at or above ``hi`` go straight to the strong tier,
  the rest cascade with confidence threshold ``t``.  Two knobs, so two curves are given:
  ``calib-selected`` picks (hi, t) per cost budget on the calib split (which neither model
  trained on) and applies those absolute thresholds to held-out; ``heldout-frontier`` is
  the best over the grid on held-out itself, an optimistic upper bound.

The historical answers have no logprobs, so the cascade here uses the answer scorer only.
Writes ``cascade.json``, ``cascade.md`` and ``cascade.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

BUDGETS = (0.1, 0.2, 0.3, 0.4, 0.5)


def _point(strong: np.ndarray, direct: np.ndarray, rows: dict) -> tuple[float, float, float]:
    """(strong share, quality, cheap calls per prompt) for a boolean 'calls strong' mask."""
    q = np.where(strong, rows["strong"], rows["weak"]).mean()
    return float(strong.mean()), float(q), float((~direct).mean())


def _ranked(score: np.ndarray, rows: dict, cascade: bool) -> list[tuple[float, float, float]]:
    n = len(score)
    order = np.argsort(-score, kind="stable")
    out = []
    for k in range(n + 1):
        strong = np.zeros(n, bool)
        strong[order[:k]] = True
        direct = np.zeros(n, bool) if cascade else strong
        out.append(_point(strong, direct, rows))
    return out


def _combo(cls: np.ndarray, conf: np.ndarray, hi: float, t: float) -> tuple[np.ndarray, np.ndarray]:
    direct = cls >= hi
    return direct | (conf < t), direct


def _grid(cls: np.ndarray, conf: np.ndarray) -> list[tuple[float, float]]:
    his = [float(np.inf)] + list(np.quantile(cls, np.linspace(0.5, 0.98, 25)))
    ts = [-1.0] + list(np.quantile(conf, np.linspace(0.02, 0.6, 30)))
    return [(h, t) for h in his for t in ts]


def _best(points: list[tuple[float, float, float]], budget: float) -> tuple[float, float, float] | None:
    ok = [p for p in points if p[0] <= budget + 1e-9]
    return max(ok, key=lambda p: p[1]) if ok else None


def _frontier(points: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    out, best = [], -1.0
    for p in sorted(points):
        if p[1] > best:
            out.append(p)
            best = p[1]
    return out


def _cost_at(points: list[tuple[float, float, float]], target: float) -> float | None:
    ok = [p[0] for p in points if p[1] >= target - 1e-12]
    return min(ok) if ok else None


def curves(held: dict, calib: dict) -> dict:
    n = len(held["weak"])
    res: dict = {"n_heldout": n, "n_calib": len(calib["weak"]),
                 "weak_quality": float(held["weak"].mean()), "strong_quality": float(held["strong"].mean())}
    gain = held["strong"] - held["weak"]
    pts = {
        "cheap only": [(0.0, res["weak_quality"], 1.0)],
        "strong only": [(1.0, res["strong_quality"], 0.0)],
        "oracle": _ranked(gain + 1e-6 * np.random.default_rng(0).random(n), held, cascade=False),
        "classifier": _ranked(held["cls"], held, cascade=False),
        "cascade": _ranked(-held["conf"], held, cascade=True),
    }
    grid = _grid(np.r_[held["cls"], calib["cls"]], np.r_[held["conf"], calib["conf"]])
    held_grid = [(_point(*_combo(held["cls"], held["conf"], h, t), held), (h, t)) for h, t in grid]
    calib_grid = [(_point(*_combo(calib["cls"], calib["conf"], h, t), calib), (h, t)) for h, t in grid]
    pts["classifier+cascade (heldout-frontier)"] = _frontier([p for p, _ in held_grid])
    chosen = []
    for budget in np.linspace(0, 1, 41):
        ok = [(p, ht) for p, ht in calib_grid if p[0] <= budget + 1e-9]
        if ok:
            _, (h, t) = max(ok, key=lambda x: (x[0][1], -x[0][0]))
            chosen.append(_point(*_combo(held["cls"], held["conf"], h, t), held))
    pts["classifier+cascade (calib-selected)"] = sorted(set(chosen))
    target = 0.95 * res["strong_quality"]
    table = {}
    for name, p in pts.items():
        table[name] = {"cost_at_95pct_strong_quality": _cost_at(p, target),
                       "quality_at_budget": {f"{b:.0%}": (_best(p, b) or (None, None))[1] for b in BUDGETS},
                       "curve": [{"strong_share": s, "quality": q, "cheap_calls": c} for s, q, c in _frontier(p)]}
    res["strategies"] = table
    res["combo_minus_classifier_at_budget"] = {
        f"{b:.0%}": _diff(table["classifier+cascade (calib-selected)"]["quality_at_budget"][f"{b:.0%}"],
                          table["classifier"]["quality_at_budget"][f"{b:.0%}"]) for b in BUDGETS}
    return res


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:.0%}" if pct else f"{v:.3f}"


def markdown(res: dict) -> str:
    lines = [f"GSM8K held-out, n={res['n_heldout']} (calib n={res['n_calib']}); weak {res['weak_quality']:.3f}, "
             f"strong {res['strong_quality']:.3f}. Cost = share of prompts calling the strong tier.", "",
             "| strategy | strong share for 95% of strong quality | "
             + " | ".join(f"quality at {b:.0%} strong" for b in BUDGETS) + " |",
             "|---|---|" + "---|" * len(BUDGETS)]
    for name, t in res["strategies"].items():
        lines.append(f"| {name} | {_fmt(t['cost_at_95pct_strong_quality'], True)} | "
                     + " | ".join(_fmt(v) for v in t["quality_at_budget"].values()) + " |")
    lines += ["", "classifier+cascade (calib-selected) minus classifier alone, same strong share: "
              + ", ".join(f"{k}: {_fmt(v)}" for k, v in res["combo_minus_classifier_at_budget"].items()),
              "", "A cascade also calls the cheap tier for every prompt it does not send straight to the "
              "strong one (cheap_calls in cascade.json)."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, t in res["strategies"].items():
        c = t["curve"]
        style = "o" if len(c) == 1 else "-"
        ax.plot([p["strong_share"] for p in c], [p["quality"] for p in c], style, label=name, drawstyle="steps-post"
                if len(c) > 1 else "default")
    ax.axhline(0.95 * res["strong_quality"], color="grey", lw=0.6, ls="--")
    ax.set(xlabel="share of prompts calling the strong tier", ylabel="GSM8K accuracy",
           title=f"GSM8K held-out (n={res['n_heldout']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: str | Path, classifier_path: str | None = None, answer_path: str | None = None,
        limit: int | None = None, cache_dir: str | None = None) -> dict:
    from kvroute.classifier.answer import load_answer_scorer, load_gsm8k_pairs
    from kvroute.classifier.model import load_scorer

    rows = load_gsm8k_pairs()
    cls_scorer = load_scorer(classifier_path, cache_dir=cache_dir)
    ans_scorer = load_answer_scorer(answer_path, cache_dir=cache_dir)
    sets = {}
    for split in ("heldout", "calib"):
        part = [r for r in rows if r["split"] == split]
        if limit:
            part = part[:: max(1, len(part) // limit)][:limit]
        prompts = [r["prompt"] for r in part]
        sets[split] = {"weak": np.array([r["weak"] for r in part], float),
                       "strong": np.array([r["strong"] for r in part], float),
                       "cls": np.array(cls_scorer.score(prompts)),
                       "conf": np.array(ans_scorer.score(prompts, [r["answer"] for r in part]))}
    res = curves(sets["heldout"], sets["calib"])
    res["classifier_version"], res["answer_version"] = cls_scorer.version, ans_scorer.version
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cascade.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "cascade.md").write_text(markdown(res))
    plot(res, out / "cascade.png")
    return res
