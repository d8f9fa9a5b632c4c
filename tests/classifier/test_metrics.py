"""RouteLLM metrics against hand-computed cases, the oracle and the random router."""

from __future__ import annotations

import numpy as np
import pytest

from kvroute.classifier.metrics import oracle, random_baseline, route_curve, summarize


def test_curve_has_eleven_points_at_exact_shares() -> None:
    shares, quality = route_curve(np.arange(20), [1] * 20, [0] * 20)
    assert len(shares) == 11
    assert np.allclose(shares, np.linspace(0, 1, 11))
    assert np.allclose(quality, shares)  # every strong call gains exactly 1


def test_oracle_without_regressions_hand_computed() -> None:
    # 10 prompts, 2 need the strong model; nothing is lost by using it elsewhere.
    strong = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    weak = [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    res = oracle(strong, weak)
    # PGR = 0, .5, 1, 1, ..., 1 -> trapezoids 0.1 * (0.25 + 0.75 + 8 * 1) = 0.9
    assert res["curve"]["pgr"] == pytest.approx([0, 0.5] + [1.0] * 9)
    assert res["apgr"] == pytest.approx(0.9)
    assert res["cpt50"] == pytest.approx(0.1)
    assert res["cpt80"] == pytest.approx(0.2)


def test_oracle_with_regressions_exceeds_one() -> None:
    # 3 prompts gain 1 with the strong model, 1 loses 1, 6 tie: total gain 2.
    strong = [1, 1, 1, 0, 1, 1, 0, 0, 1, 1]
    weak = [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    res = oracle(strong, weak)
    # PGR = 0, .5, 1, 1.5 x7, 1 -> 0.1 * (0.25 + 0.75 + 1.25 + 6 * 1.5 + 1.25) = 1.25
    assert res["apgr"] == pytest.approx(1.25)
    assert res["strong_quality"] == pytest.approx(0.7)
    # 95% of strong quality (0.665): quality is 0.6 at share 0.1, 0.7 at share 0.2
    assert res["strong_share_for_95"] == pytest.approx(0.2)


def test_cpt_is_first_crossing_not_interpolated() -> None:
    # Ranking: gains at ranks 1 and 4 of 10; gap total 2.
    strong = [1] * 10
    weak = [0, 1, 1, 0, 1, 1, 1, 1, 1, 1]
    scores = np.linspace(1, 0, 10)  # keeps the listed order
    res = summarize(scores, strong, weak)
    assert res["curve"]["pgr"][:5] == pytest.approx([0, 0.5, 0.5, 0.5, 1.0])
    assert res["cpt50"] == pytest.approx(0.1)
    assert res["cpt80"] == pytest.approx(0.4)  # 0.4, not an interpolated 0.34
    # APGR: 0.1 * (0.25 + 0.5 + 0.5 + 0.75 + 6 * 1) = 0.8
    assert res["apgr"] == pytest.approx(0.8)


def test_reversed_oracle_is_worst() -> None:
    strong, weak = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    anti = summarize([0, 0, 1, 1, 1, 1, 1, 1, 1, 1], strong, weak)  # needed prompts last
    # PGR = 0 until the last two cuts: 0, ..., 0, .5, 1 -> 0.1 * (0.25 + 0.75) = 0.1
    assert anti["apgr"] == pytest.approx(0.1)


def test_random_router_is_about_half() -> None:
    rng = np.random.default_rng(7)
    strong = (rng.random(4000) < 0.8).astype(float)
    weak = (rng.random(4000) < 0.65).astype(float)
    res = random_baseline(strong, weak, seeds=20)
    assert res["apgr"] == pytest.approx(0.5, abs=0.02)
    assert res["cpt50"] == pytest.approx(0.5, abs=0.1)


def test_constant_scores_behave_like_random() -> None:
    rng = np.random.default_rng(3)
    strong = (rng.random(3000) < 0.8).astype(float)
    weak = (rng.random(3000) < 0.65).astype(float)
    assert summarize(np.zeros(3000), strong, weak)["apgr"] == pytest.approx(0.5, abs=0.05)


def test_graded_scores() -> None:
    strong, weak = [9, 8, 7, 10], [3, 8, 7, 9]
    res = oracle(strong, weak)
    assert res["strong_quality"] == pytest.approx(8.5)
    assert res["curve"]["quality"][-1] == pytest.approx(8.5)
    assert res["curve"]["quality"][0] == pytest.approx(6.75)


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError):
        summarize([0.1, 0.2], [1], [0])
