"""Threshold calibration: pick the score cut that sends a target share to the strong tier.

As in RouteLLM, the threshold is a quantile of the scores on a calibration set (a split
kept out of training and out of the held-out evaluation): with ``strong_share = 0.3``
about 30% of calibration prompts score at or above it.  The calibration set should look
like production traffic; the share drifts when traffic does, so recalibrate on logs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def threshold_for_share(scores: Sequence[float], strong_share: float) -> float:
    """The smallest observed score such that ``mean(scores >= t)`` is closest to the target.

    Working on observed scores (not an interpolated quantile) keeps the achieved share
    exact up to ties: with n distinct scores it is within 1/n of ``strong_share``.
    """
    if not 0.0 <= strong_share <= 1.0:
        raise ValueError("strong_share must be within [0, 1]")
    s = np.sort(np.asarray(scores, dtype=float))[::-1]  # descending
    if len(s) == 0:
        raise ValueError("calibration needs at least one score")
    k = round(strong_share * len(s))
    if k == 0:
        return float(np.nextafter(s[0], np.inf))  # nothing reaches it
    return float(s[k - 1])


def achieved_share(scores: Sequence[float], threshold: float) -> float:
    return float(np.mean(np.asarray(scores, dtype=float) >= threshold))


def calibrate(scorer: object, prompts: Sequence[str], strong_share: float) -> dict:
    """Set ``scorer.threshold`` from its scores on ``prompts``; returns what was done."""
    scores = scorer.score(list(prompts))  # type: ignore[attr-defined]
    threshold = threshold_for_share(scores, strong_share)
    scorer.threshold = threshold  # type: ignore[attr-defined]
    calib = {"target_strong_share": strong_share, "threshold": threshold,
             "achieved_strong_share": achieved_share(scores, threshold),
             "n_prompts": len(scores)}
    meta = getattr(scorer, "metadata", None)
    if isinstance(meta, dict):
        meta["calibration"] = calib
    return calib
