"""Leave-one-task-out validation: units, the left-out unit never trained on, and the heads."""

from __future__ import annotations

import numpy as np

from kvroute.classifier.data import Record, load_routellm
from kvroute.classifier.head import fit_head, fit_logistic
from kvroute.classifier.loto import MMLU_GROUPS, RECIPES, UNITS, Recipe, layer_features, loto, unit_of
from kvroute.classifier.metrics import summarize


def test_every_mmlu_subject_has_exactly_one_group(routellm_data) -> None:
    subjects = {r.group for r in load_routellm(["mmlu"])}
    grouped = [s for g in MMLU_GROUPS.values() for s in g]
    assert len(grouped) == len(set(grouped)) == 57
    assert subjects == set(grouped)
    assert unit_of(Record("q", {}, "mmlu", "virology")) == "mmlu:other"
    assert unit_of(Record("q", {}, "gsm8k", "gsm8k")) == "gsm8k"


def _synthetic(seed: int = 0) -> tuple[list[Record], np.ndarray]:
    """Three tasks that differ in average difficulty, sharing one within-task difficulty
    direction (feature 0): what LOTO rewards and a task-level shortcut does not."""
    rng = np.random.default_rng(seed)
    recs, rows = [], []
    for t, (task, offset) in enumerate((("mmlu", 0.0), ("gsm8k", 1.5), ("mt_bench", -1.5))):
        for i in range(300):
            hard = rng.normal()
            task_dir = np.zeros(8)
            task_dir[1 + t] = 3.0  # each task sits in its own corner of feature space
            x = np.r_[hard, rng.normal(0, 0.3, 7)] + task_dir
            p = 1 / (1 + np.exp(-(2 * hard + offset - 1)))
            needed = rng.random() < p
            group = "virology" if task == "mmlu" else task
            recs.append(Record(f"{task} {i}", {"s": 1.0, "w": 0.0 if needed else 1.0}, task, group))
            rows.append(x)
    x = np.asarray(rows, dtype=np.float32)
    return recs, np.c_[x, np.zeros((len(x), 390 - x.shape[1]), dtype=np.float32)]


def test_loto_scores_each_left_out_unit_with_a_model_that_never_saw_it() -> None:
    recs, x = _synthetic()
    units = ("mmlu:other", "gsm8k", "mt_bench")
    res = loto(recs, x, [RECIPES["default"], RECIPES["logreg"]], "s", "w", units)
    assert res["n_prompts"] == {u: 300 for u in units}
    rand = res["models"]["random"]
    assert abs(rand["mean"] - 0.5) < 0.05
    for name in ("default", "logreg"):
        m = res["models"][name]
        assert m["below_random"] == [] and m["mean"] > 0.6  # feature 0 carries over


def test_within_task_centring_ignores_which_task_is_harder() -> None:
    recs, x = _synthetic(1)
    gain = np.array([r.scores["s"] - r.scores["w"] for r in recs])
    tasks = np.array([r.task for r in recs])
    within = fit_head(x[:, :8], gain, kind="gain_within", gain=gain, groups=tasks)
    plain = fit_head(x[:, :8], gain, kind="gain", gain=gain)
    w_within, w_plain = within.w1[:, 0] * within.std[:8] ** -1, plain.w1[:, 0] / plain.std[:8]
    # the task corners (features 1-3) explain between-task differences only
    assert np.abs(w_within[1:4]).max() < 0.2 * abs(w_within[0])
    assert np.abs(w_plain[1:4]).max() > np.abs(w_within[1:4]).max()


def test_numpy_logistic_regression_separates_and_balances_classes() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    y = (x[:, 0] + 0.3 * rng.normal(size=400) > 1.0).astype(float)  # rare positives
    head = fit_logistic(x, y, l2=1e-3)
    p = head.predict(x)
    assert summarize(p, y.tolist(), [0.0] * len(y))["apgr"] > 0.9
    plain = fit_logistic(x, y, l2=1e-3, balance=False).predict(x)
    # balanced classes weigh the rare positives up: more prompts cross 0.5
    assert (p >= 0.5).mean() > (plain >= 0.5).mean() and p.mean() > plain.mean()


def test_mf_head_learns_from_decisive_pairs_only() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 2))
    gain = np.where(x[:, 0] > 0.5, 1.0, np.where(x[:, 0] < -0.5, -1.0, 0.0))
    head = fit_head(x, (gain > 0).astype(float), kind="mf", gain=gain)
    assert head.predict(np.array([[2.0, 0.0]]))[0] > 0.9 > 0.1 > head.predict(np.array([[-2.0, 0.0]]))[0]


def test_a_recipe_can_drop_the_surface_features() -> None:
    x = np.ones((2, 390))
    assert Recipe("r", surface=False).features(x).shape == (2, 384)
    assert Recipe("r", surface=True).features(x).shape == (2, 390)
    assert Recipe("r", surface=False).features(np.ones((2, 774))).shape == (2, 768)
    assert UNITS[-1] == "mt_bench"


def test_layer_features_put_each_layer_beside_the_embedding_layer() -> None:
    prompts = ["What is 17 * 23?", "Which organ makes insulin?", "Write a poem about the sea."]
    shipped = layer_features(prompts, [0])
    both = layer_features(prompts, [0, 1])
    assert shipped.shape == (3, 390) and both.shape == (3, 774)
    np.testing.assert_allclose(both[:, :384], shipped[:, :384])  # the numpy embedding layer
    np.testing.assert_allclose(both[:, -6:], shipped[:, -6:])  # surface features last, once
    np.testing.assert_allclose(np.linalg.norm(both[:, 384:768], axis=1), 1.0, rtol=1e-5)
    assert np.abs(both[:, 384:768] - both[:, :384]).max() > 0.05  # layer 1 is another view
