"""Calibration hits the requested strong share on the calibration set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvroute.classifier.calibrate import achieved_share, calibrate, threshold_for_share
from kvroute.classifier.data import load_jsonl
from kvroute.classifier.model import load_scorer


@pytest.mark.parametrize("share", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_threshold_hits_share(share: float) -> None:
    scores = np.random.default_rng(1).beta(2, 5, size=997)
    t = threshold_for_share(scores, share)
    assert abs(achieved_share(scores, t) - share) <= 0.02


def test_ties_do_not_break_it() -> None:
    scores = np.repeat(np.linspace(0, 1, 200), 5)  # every score five times
    t = threshold_for_share(scores, 0.3)
    assert abs(achieved_share(scores, t) - 0.3) <= 0.02


def test_rejects_bad_share() -> None:
    with pytest.raises(ValueError):
        threshold_for_share([0.1, 0.2], 1.5)


def test_real_scorer_on_calibration_set(toy_model: Path, toy_jsonl: Path) -> None:
    scorer = load_scorer(toy_model)
    # calibrate on every non-held-out prompt (96 of them) so a 2-point tolerance is meaningful
    prompts = [r.prompt for r in load_jsonl(toy_jsonl) if r.split != "heldout"]
    for share in (0.2, 0.3, 0.5):
        info = calibrate(scorer, prompts, share)
        assert scorer.threshold == info["threshold"]
        got = np.mean(np.array(scorer.score(prompts)) >= scorer.threshold)
        assert abs(got - share) <= 0.02, (share, got)
