"""Data loading, labels, fixed splits and decontamination (real RouteLLM files)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from kvroute.classifier.data import (
    ROUTELLM_STRONG,
    ROUTELLM_WEAK,
    DataMissing,
    Record,
    assign_split,
    data_dir,
    label,
    load,
    load_jsonl,
    question_text,
    select,
)


def test_label_binary_and_graded() -> None:
    def rec(s: float, w: float) -> Record:
        return Record("p", {"s": s, "w": w})

    assert [label(rec(*sw), "s", "w") for sw in ((1, 0), (1, 1), (0, 1), (0, 0))] == [1, 0, 0, 0]
    assert label(rec(8, 7), "s", "w") == 1
    assert label(rec(8, 7.5), "s", "w") == 0
    assert label(rec(8, 7), "s", "w", margin=2) == 0


def test_question_text_strips_few_shot_examples() -> None:
    prompt = ("The following are multiple choice questions (with answers) about anatomy.\n\n"
              "Q1?\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
              "Q2?\nA. a\nB. b\nC. c\nD. d\nAnswer: D\n\n"
              "Which bone is longest?\nA. femur\nB. ulna\nC. rib\nD. skull\nAnswer:")
    assert question_text(prompt) == ("Which bone is longest?\nA. femur\nB. ulna\nC. rib\n"
                                     "D. skull\nAnswer:")
    assert question_text("plain question?") == "plain question?"


def test_missing_data_dir_fails_with_clear_message(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    monkeypatch.setenv("KVROUTE_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataMissing, match="RouteLLM data not found"):
        data_dir()
    with pytest.raises(DataMissing):
        load("routellm:gsm8k")


def test_routellm_counts_splits_and_decontamination(routellm_data: Path) -> None:
    recs = load("routellm")
    tasks = Counter(r.task for r in recs)
    assert tasks == {"mmlu": 14042 - 5, "gsm8k": 1319 - 12, "mt_bench": 2 * (80 - 8)}
    bad = set()
    for task in ("mmlu", "gsm8k", "mt_bench"):
        with (routellm_data / "routellm" / task / "contaminated_prompts.jsonl").open() as fh:
            bad |= {" ".join(json.loads(line)["eval_prompt"].split()) for line in fh}
    assert not any(" ".join(r.prompt.split()) in bad for r in recs)
    assert all(r.split == "heldout" for r in recs if r.task == "mt_bench")
    for task in ("mmlu", "gsm8k"):
        rows = [r for r in recs if r.task == task]
        assert 0.27 < sum(r.split == "heldout" for r in rows) / len(rows) < 0.33
        # a seeded split by prompt: every subject is represented on both sides
        held_groups = {r.group for r in rows if r.split == "heldout"}
        assert held_groups == {r.group for r in rows if r.split != "heldout"}


def test_training_never_sees_heldout(routellm_data: Path) -> None:
    recs = load("routellm")
    held = {r.prompt for r in recs if r.split == "heldout"}
    train = select(recs, ["train", "calib"], ROUTELLM_STRONG, ROUTELLM_WEAK)
    assert train and not any(r.prompt in held for r in train)
    assert {r.split for r in train} == {"train", "calib"}


def test_split_is_a_fixed_function_of_the_prompt() -> None:
    assert assign_split("gsm8k", "x + 1 = 2") == assign_split("gsm8k", "x + 1 = 2")
    assert assign_split("mmlu", "x + 1 = 2") == assign_split("gsm8k", "x + 1 = 2")
    assert assign_split("mt_bench", "anything") == "heldout"


def test_load_jsonl_reports_bad_lines(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "hi", "scores": {"a": 1, "b": 0}}) + "\n\n")
    (rec,) = load_jsonl(good)
    assert rec.scores == {"a": 1.0, "b": 0.0} and rec.split in ("train", "calib", "heldout")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_jsonl(bad)
