"""Every CLI subcommand runs end to end on small data and writes what it promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvroute.classifier.artifact import read_metadata, resolve_artifact
from kvroute.classifier.cli import main
from kvroute.classifier.data import load_jsonl

STRONG, WEAK = "big", "small"  # the toy logs' model names (see conftest)
TOY = ["--strong", STRONG, "--weak", WEAK]


def test_convert_routellm_to_jsonl(routellm_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "mt.jsonl"
    assert main(["convert", "--data", "routellm:mt_bench", "--out", str(out)]) == 0
    recs = load_jsonl(out)
    assert len(recs) == 144 and all(r.split == "heldout" and r.task == "mt_bench" for r in recs)
    assert set(recs[0].scores) == {"gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1"}


def test_train_writes_calibrated_artifact(toy_model: Path) -> None:
    meta = read_metadata(toy_model)
    assert meta["variant"] == "frozen" and (toy_model / "head.npz").is_file()
    assert meta["calibration"]["target_strong_share"] == 0.3
    assert meta["training_data"]["n_prompts"] == 72  # train split only


def test_calibrate_rewrites_threshold(toy_model: Path, toy_jsonl: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    assert main(["export", "--model", str(toy_model), "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main(["calibrate", "--model", str(tmp_path / "m"), "--data", str(toy_jsonl), *TOY,
                 "--split", "all", "--strong-share", "0.5"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert abs(info["achieved_strong_share"] - 0.5) <= 0.02
    meta = read_metadata(tmp_path / "m")
    assert meta["threshold"] == info["threshold"]
    assert meta["version"] == info["version"] != read_metadata(toy_model)["version"]


def test_eval_writes_report(toy_model: Path, toy_jsonl: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(toy_model), "--data", str(toy_jsonl), *TOY,
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    for key in ("apgr", "cpt50", "cpt80", "strong_share_for_95", "n_prompts", "random"):
        assert key in res
    assert res["n_prompts"] == 120 and res["split"] == "all"  # a user's JSONL: every row
    assert res["apgr"] > res["random"]["apgr"]
    assert (out / "curve.png").stat().st_size > 1000
    assert "| toy | random |" in (out / "results.md").read_text()


def test_eval_of_a_jsonl_scores_only_the_split_asked_for(toy_model: Path, toy_jsonl: Path,
                                                        tmp_path: Path) -> None:
    assert main(["eval", "--model", str(toy_model), "--data", str(toy_jsonl), *TOY,
                 "--split", "heldout", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["n_prompts"] == 24 and res["split"] == "heldout"


def test_eval_compare_reports_the_candidate_and_agreement(toy_model: Path, toy_jsonl: Path,
                                                         tmp_path: Path) -> None:
    cand = tmp_path / "cand"
    assert main(["train", "--data", str(toy_jsonl), *TOY, "--out", str(cand), "--head", "logreg"]) == 0
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(toy_model), "--data", str(toy_jsonl), *TOY,
                 "--compare", str(cand), "--out", str(out)]) == 0
    cmp = json.loads((out / "results.json").read_text())["compare"]
    assert cmp["candidate_version"] == read_metadata(cand)["version"]
    assert 0.5 < cmp["agreement"] <= 1.0  # both separate the toy data's two kinds of prompt
    assert cmp["candidate"]["apgr"] > 0.6 and cmp["rank_correlation"] > 0.3
    assert "Decisions agree on" in (out / "results.md").read_text()


def test_loto_writes_a_table_per_unit(routellm_data: Path, tmp_path: Path) -> None:
    assert main(["loto", "--data", "routellm", "--limit", "1500", "--recipes", "default,logreg",
                 "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "loto.json").read_text())
    assert set(res["models"]) == {"random", "default", "logreg"}
    assert set(res["units"]) >= {"mmlu:stem", "mmlu:humanities", "gsm8k"}
    for m in res["models"].values():
        assert set(m["per_unit"]) == set(res["units"])
        assert m["worst"] == min(m["per_unit"].values()) <= m["mean"]
    assert "| default |" in (tmp_path / "loto.md").read_text()


def test_loto_rejects_an_unknown_recipe(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown recipe 'nope'"):
        main(["loto", "--recipes", "nope", "--out", str(tmp_path)])


@pytest.mark.parametrize("layers", ["7", "0,0", "one"])
def test_loto_rejects_bad_layers(tmp_path: Path, layers: str) -> None:
    with pytest.raises(SystemExit, match="--layers must be distinct MiniLM layers 0-6"):
        main(["loto", "--layers", layers, "--out", str(tmp_path)])


def test_loto_compares_deeper_layers(routellm_data: Path, tmp_path: Path) -> None:
    assert main(["loto", "--data", "routellm", "--limit", "600", "--recipes", "default",
                 "--layers", "0,2", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "loto.json").read_text())
    assert res["layers"] == [0, 2]
    assert 0.0 <= res["models"]["default"]["worst"] <= res["models"]["default"]["mean"] <= 1.0


def test_eval_default_model_on_heldout_split(routellm_data: Path, tmp_path: Path) -> None:
    assert main(["eval", "--out", str(tmp_path), "--limit", "60"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["split"] == "heldout" and set(res["per_task"]) == {"mmlu", "gsm8k", "mt_bench"}


def test_export_with_metrics_and_pointer(toy_model: Path, toy_jsonl: Path,
                                         tmp_path: Path) -> None:
    root = tmp_path / "models"
    assert main(["export", "--model", str(toy_model), "--out", str(root), "--pointer",
                 "--version", "v7", "--data", str(toy_jsonl), *TOY]) == 0
    path, version = resolve_artifact(root)
    assert version == "v7" and path.name == "v7"
    acc = read_metadata(path)["accepted_with"]
    assert acc["n_prompts"] == 24 and acc["apgr"] > acc["random_apgr"]


def test_refresh_accepts_then_keeps(toy_jsonl: Path, tmp_path: Path, toy: object,
                                    capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "models"
    new = toy.write(toy.records(90, seed=5), tmp_path / "new.jsonl")
    # a fresh root: the first candidate is accepted; its encoder config is then reused
    assert main(["export", "--model", str(_toy(tmp_path, toy_jsonl)), "--out", str(root),
                 "--pointer", "--version", "v1"]) == 0
    capsys.readouterr()
    assert main(["refresh", "--root", str(root), "--new", str(new), "--heldout",
                 str(toy_jsonl), *TOY, "--min-gain", "0.5"]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["accepted"] is False and decision["current"] == "v1"
    assert main(["refresh", "--root", str(root), "--new", str(new), "--heldout",
                 str(toy_jsonl), *TOY, "--min-gain", "-1"]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["accepted"] is True and decision["current"] == decision["candidate_version"]


def _toy(tmp_path: Path, toy_jsonl: Path) -> Path:
    out = tmp_path / "small"
    assert main(["train", "--data", str(toy_jsonl), *TOY, "--out", str(out), "--n-layers", "1",
                 "--max-tokens", "32"]) == 0
    return out


def test_bench_writes_json_and_md(toy_model: Path, tmp_path: Path) -> None:
    assert main(["bench", "--model", str(toy_model), "--out", str(tmp_path), "--tokens", "64",
                 "--repeats", "5", "--batch-size", "4"]) == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["tokens"] == 64 and res["threads"] == 1 and res["latency_ms_p50"] > 0
    assert "p50 ms" in (tmp_path / "bench.md").read_text()


def test_loto_leaves_out_the_units_asked_for(tmp_path: Path) -> None:
    """A task outside the six RouteLLM units is scored when --units names it, and trains the
    named units' folds otherwise."""
    rows = []
    for task, n in (("alpha", 60), ("beta", 60), ("gamma", 40)):
        for i in range(n):
            hard = i % 2 == 0
            rows.append({"prompt": f"{task} question {i} " + ("prove the theorem " * 3 if hard else "say hi"),
                         "scores": {"big": 1.0, "small": 0.0 if hard else 1.0}, "task": task})
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "loto"
    assert main(["loto", "--data", str(data), "--strong", "big", "--weak", "small", "--recipes", "default",
                 "--units", "alpha,beta", "--out", str(out)]) == 0
    res = json.loads((out / "loto.json").read_text())
    assert res["units"] == ["alpha", "beta"]
    assert res["n_prompts"] == {"alpha": 60, "beta": 60}
    assert res["models"]["default"]["per_unit"]["alpha"] > 0.6  # the hard prompts rank first
    with pytest.raises(SystemExit, match="--units: no record of unit 'delta'"):
        main(["loto", "--data", str(data), "--strong", "big", "--weak", "small", "--units", "alpha,delta",
              "--out", str(out)])
