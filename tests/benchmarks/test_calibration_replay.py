"""The calibration replay: the online threshold holds the share where the static one drifts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kvroute.benchmarks.calibration_replay import main, replay, scale_out, summarise
from kvroute.router.config import OnlineCalibrationConfig


def test_replay_counts_decisions_at_the_threshold_in_force() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.2] * 50)
    res = replay(scores, 0.5, OnlineCalibrationConfig(0.5, step=0.01), batch=4)
    assert res["static_strong"].mean() == 0.5
    assert np.array_equal(res["online_strong"][:4], [True, False, True, False])
    summary = summarise({**res, "static_threshold": 0.5}, 0.5, block=40)
    assert summary["online"]["max_block_deviation"] == 0.0 and summary["static"]["blocks"] == 4


def test_a_replica_that_joins_starts_at_the_fleets_threshold_only_when_shared() -> None:
    # harder traffic than the artifact was calibrated on: its threshold (0.5) sends 71% strong
    scores = np.random.default_rng(0).uniform(0.3, 1.0, 6000)
    res = scale_out(scores, 0.5, OnlineCalibrationConfig(0.3), replicas=4, join_at=3000, batch=8)
    alone, shared = res["alone"], res["shared"]
    assert alone["new_replica_first_requests_share"] > 0.38  # starts at 0.5 and catches up alone
    assert abs(shared["new_replica_first_requests_share"] - 0.3) <= 0.05  # starts where the fleet is
    assert abs(shared["fleet_share_after_join"] - 0.3) < abs(alone["fleet_share_after_join"] - 0.3)


def test_replay_of_the_shipped_classifier_writes_the_report_and_plot(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path), "--plot", str(tmp_path / "copy.png")]) == 0
    res = json.loads((tmp_path / "replay.json").read_text())
    assert res["n_requests"] == 10244 and [f[0] for f in res["families"]][:2] == ["MMLU humanities", "GSM8K"]
    assert res["online"]["max_block_deviation"] <= 0.03 < res["static"]["max_block_deviation"]
    q = res["quality_binary_tasks"]
    assert q["random"] < q["static"] <= q["online"] <= q["per_family_quantile"] + 0.005
    so = res["scale_out"]
    assert so["replicas"] == 4 and set(so) >= {"alone", "shared"}
    assert (tmp_path / "replay.png").stat().st_size > 10_000 and (tmp_path / "copy.png").is_file()
