"""The similarity-weighted neighbour term of the default ``gain_knn`` head."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvroute.classifier.head import Head, fit_head, neighbour_gain
from kvroute.classifier.metrics import summarize


def unit(rows: list[list[float]]) -> np.ndarray:
    a = np.array(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_neighbour_gain_matches_a_hand_computation() -> None:
    bank = unit([[1, 0], [0, 1], [1, 1], [-1, 0]])
    gain = np.array([1.0, -1.0, 0.5, 0.0])
    q = unit([[1, 0.2]])
    sims = bank @ q[0]
    top = np.argsort(-sims)[:2]  # [1, 0] and [1, 1] are nearest
    w = np.exp((sims[top] - 1) * 10)
    expected = (w * gain[top]).sum() / w.sum()
    assert set(top) == {0, 2}
    assert np.isclose(neighbour_gain(q, bank, gain, k=2, temp=10)[0], expected)


def test_neighbour_gain_leaves_each_training_row_out_of_its_own_neighbourhood() -> None:
    bank = unit([[1, 0], [1, 0.01], [0, 1]])
    gain = np.array([1.0, -1.0, 0.0])
    # with itself excluded, row 0's single nearest neighbour is row 1, and vice versa
    assert np.allclose(neighbour_gain(bank, bank, gain, k=1, temp=10, skip_self=True)[:2], [-1, 1])
    assert np.allclose(neighbour_gain(bank[:1], bank[:1], gain[:1], k=5, temp=10, skip_self=True), 0)


def xor_clusters(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Four clusters on the unit circle; the strong model is needed in two opposite ones.

    No linear function of the embedding separates them; neighbours do.
    """
    rng = np.random.default_rng(seed)
    centre = rng.integers(0, 4, n)
    angle = centre * np.pi / 2 + rng.normal(0, 0.15, n)
    x = np.c_[np.cos(angle), np.sin(angle), rng.normal(0, 0.05, (n, 2))].astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    hard = (centre % 2 == 0) & (rng.random(n) < 0.8)
    strong = np.ones(n)
    weak = np.where(hard, 0.0, 1.0)
    return x, strong, weak, strong - weak


def test_gain_knn_learns_what_a_linear_head_cannot() -> None:
    x, strong, weak, gain = xor_clusters(600, seed=0)
    xt, st, wt, _ = xor_clusters(400, seed=1)
    scores = {"oracle": summarize((st - wt), st.tolist(), wt.tolist())["apgr"]}
    for kind in ("gain", "gain_knn"):
        head = fit_head(x, (gain > 0).astype(float), kind=kind, gain=gain)
        scores[kind] = summarize(head.predict(xt), st.tolist(), wt.tolist())["apgr"]
    assert abs(scores["gain"] - 0.5) < 0.05  # no better than random
    assert scores["gain_knn"] > 0.85 * scores["oracle"]


def test_gain_knn_head_round_trips_through_npz(tmp_path: Path) -> None:
    x, _, _, gain = xor_clusters(300, seed=2)
    head = fit_head(x, (gain > 0).astype(float), kind="gain_knn", gain=gain,
                    weight=np.linspace(0.5, 1.5, len(x)))
    head.save(tmp_path / "head.npz")
    with np.load(tmp_path / "head.npz") as z:
        assert z["bank"].dtype == np.float16  # stored at half size
    loaded = Head.load(tmp_path / "head.npz")
    assert np.array_equal(loaded.predict(x), head.predict(x))
