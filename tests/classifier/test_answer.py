"""The cascade's answer scorer and its CLI subcommands: answer-train, answer-eval, cascade-eval."""

from __future__ import annotations

import json

from kvroute.classifier.answer import answer_features, auroc, load_answer_scorer, load_gsm8k_answers
from kvroute.classifier.cli import main


def test_answer_features_see_final_numbers_hedging_and_bad_arithmetic():
    good = answer_features("q?", "3 + 4 = 7\nSo the answer is 7.")
    bad = answer_features("q?", "Maybe 3 + 4 = 8, I think. Not sure.")
    assert good[2] == 1.0 and bad[2] == 0.0  # a final answer statement
    assert bad[4] > good[4]  # hedging
    assert bad[7] == 1.0 and good[7] == 0.0  # wrong arithmetic step
    assert answer_features("q?", "")[-1] == 1.0


def test_auroc_ranks():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.5, 0.5], [0, 1]) == 0.5


def test_gsm8k_answers_keep_the_fixed_split(routellm_data):
    recs = load_gsm8k_answers()
    assert {r.split for r in recs} == {"train", "calib", "heldout"}
    assert all(r.answer for r in recs[:20]) and {r.correct for r in recs} == {0, 1}


def test_cli_answer_train_eval_and_cascade_eval(routellm_data, tmp_path, capsys):
    model = tmp_path / "answer"
    assert main(["answer-train", "--out", str(model), "--limit", "60", "--max-tokens", "64"]) == 0
    scorer = load_answer_scorer(model)
    p = scorer.score(["What is 2 + 2?"], ["2 + 2 = 4. The answer is 4."])
    assert 0.0 <= p[0] <= 1.0
    capsys.readouterr()
    assert main(["answer-eval", "--model", str(model), "--limit", "40", "--out", str(tmp_path / "ev")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 40 and 0 <= res["auroc"] <= 1
    out = tmp_path / "cascade"
    assert main(["cascade-eval", "--answer-model", str(model), "--limit", "40", "--out", str(out)]) == 0
    res = json.loads((out / "cascade.json").read_text())
    assert {"classifier", "cascade", "oracle", "classifier+cascade (calib-selected)"} <= set(res["strategies"])
    assert (out / "cascade.png").stat().st_size > 0 and "| cascade |" in (out / "cascade.md").read_text()


def test_the_shipped_answer_artifact_loads():
    scorer = load_answer_scorer()
    assert scorer.metadata["logprob_features"] is False
    assert len(scorer.score(["q"], ["a"])) == 1
