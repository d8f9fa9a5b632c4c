"""RouteLLM's router metrics, in numpy: the quality/cost curve, PGR, APGR and CPT.

A router's scores are sorted (highest first) and cut at 10 quantiles, giving 11 points
(share of calls to the strong model, quality).  Quality is the mean score of whichever
model each prompt was sent to.  PGR = (quality - weak) / (strong - weak); APGR is the
trapezoid area under PGR over the strong share 0..1; CPT(x) is the strong share at the
first of the 11 points whose PGR reaches x (not interpolated).  The random router and the
oracle go through the same code, so baselines and models are measured alike.

Ties in the scores are broken by a seeded random permutation, so a constant-score router
behaves as a random one rather than as the order of the file.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N_POINTS = 11
EPS = 1e-9


def route_curve(scores: Sequence[float], strong_q: Sequence[float], weak_q: Sequence[float],
                n_points: int = N_POINTS, tie_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(strong shares, qualities) at ``n_points`` evenly spaced cuts of the score ranking."""
    s, sq, wq = (np.asarray(a, dtype=float) for a in (scores, strong_q, weak_q))
    n = len(s)
    if n == 0 or not len(sq) == len(wq) == n:
        raise ValueError("scores, strong_q and weak_q must be non-empty and of equal length")
    tie = np.random.default_rng(tie_seed).permutation(n)
    order = np.lexsort((tie, -s))  # by score descending, ties in seeded random order
    gain = np.concatenate([[0.0], np.cumsum((sq - wq)[order])])
    counts = np.rint(np.linspace(0, n, n_points)).astype(int)
    return counts / n, (wq.sum() + gain[counts]) / n


def pgr(quality: np.ndarray, strong_mean: float, weak_mean: float) -> np.ndarray:
    """Performance gap recovered; NaN-free: a zero gap gives PGR 1 everywhere."""
    gap = strong_mean - weak_mean
    if abs(gap) < EPS:
        return np.ones_like(quality)
    return (quality - weak_mean) / gap


def first_share(shares: np.ndarray, values: np.ndarray, target: float) -> float | None:
    """Strong share at the first point whose value reaches ``target`` (None if never)."""
    hit = np.nonzero(values >= target - EPS)[0]
    return float(shares[hit[0]]) if len(hit) else None


def summarize(scores: Sequence[float], strong_q: Sequence[float], weak_q: Sequence[float],
              tie_seed: int = 0) -> dict:
    """APGR, CPT(50%), CPT(80%), strong share for 95% of strong quality, and the curve."""
    sq, wq = np.asarray(strong_q, dtype=float), np.asarray(weak_q, dtype=float)
    shares, quality = route_curve(scores, sq, wq, tie_seed=tie_seed)
    strong_mean, weak_mean = float(sq.mean()), float(wq.mean())
    p = pgr(quality, strong_mean, weak_mean)
    return {
        "n_prompts": len(sq),
        "apgr": float(np.trapezoid(p, shares)),
        "cpt50": first_share(shares, p, 0.5),
        "cpt80": first_share(shares, p, 0.8),
        "strong_share_for_95": first_share(shares, quality, 0.95 * strong_mean),
        "strong_quality": strong_mean,
        "weak_quality": weak_mean,
        "curve": {"strong_share": shares.tolist(), "quality": quality.tolist(),
                  "pgr": p.tolist()},
    }


def random_baseline(strong_q: Sequence[float], weak_q: Sequence[float], seeds: int = 20) -> dict:
    """The random router (uniform scores), averaged over ``seeds`` draws, curve included."""
    runs = [summarize(np.random.default_rng(1000 + i).random(len(strong_q)), strong_q, weak_q)
            for i in range(seeds)]
    out = {k: _mean([r[k] for r in runs]) for k in ("apgr", "cpt50", "cpt80",
                                                    "strong_share_for_95")}
    out["n_prompts"] = runs[0]["n_prompts"]
    out["seeds"] = seeds
    out["curve"] = {k: np.mean([r["curve"][k] for r in runs], axis=0).tolist()
                    for k in ("strong_share", "quality", "pgr")}
    return out


def oracle(strong_q: Sequence[float], weak_q: Sequence[float]) -> dict:
    """The router that knows each prompt's outcome: scores = strong - weak."""
    gain = np.asarray(strong_q, dtype=float) - np.asarray(weak_q, dtype=float)
    return summarize(gain, strong_q, weak_q)


def operating_point(scores: Sequence[float], threshold: float, strong_q: Sequence[float],
                    weak_q: Sequence[float]) -> dict:
    """Strong share and quality when routing with ``score >= threshold``."""
    s = np.asarray(scores, dtype=float)
    strong = s >= threshold
    q = np.where(strong, np.asarray(strong_q, dtype=float), np.asarray(weak_q, dtype=float))
    return {"threshold": float(threshold), "strong_share": float(strong.mean()),
            "quality": float(q.mean())}


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if len(vals) == len(values) else None
