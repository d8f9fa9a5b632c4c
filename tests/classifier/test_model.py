"""Scorer API: export -> load round trip, pointer resolution, thread safety, default model."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvroute.classifier.artifact import export, read_metadata, swap_pointer
from kvroute.classifier.data import load_jsonl
from kvroute.classifier.model import DEFAULT_ARTIFACT, load_scorer, resolve_artifact


def test_export_round_trip_gives_identical_scores(toy_model: Path, toy_jsonl: Path,
                                                  tmp_path: Path) -> None:
    prompts = [r.prompt for r in load_jsonl(toy_jsonl)][:24]
    original = load_scorer(toy_model)
    dest = export(toy_model, tmp_path / "exported" / "v1", {"version": "v1"})
    copy = load_scorer(dest)
    assert copy.score(prompts) == original.score(prompts)
    assert copy.threshold == original.threshold
    assert copy.version == "v1"
    meta = read_metadata(dest)
    assert meta["variant"] == "frozen" and meta["encoder_config"]["n_layers"] == 2
    assert "training_data" in meta and "created" in meta
    with pytest.raises(FileExistsError):
        export(toy_model, dest)


def test_pointer_dir_symlink_and_file(toy_model: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    export(toy_model, root / "a", {"version": "a"})
    export(toy_model, root / "b", {"version": "b"})
    swap_pointer(root, "a")
    assert resolve_artifact(root) == ((root / "a").resolve(), "a")
    swap_pointer(root, "b")
    assert resolve_artifact(root)[1] == "b" and load_scorer(root).version == "b"
    os.remove(root / "current")
    (root / "current").write_text("a\n")  # file form, for filesystems without symlinks
    assert resolve_artifact(root)[1] == "a"
    with pytest.raises(FileNotFoundError):
        resolve_artifact(tmp_path)


def test_score_is_thread_safe(toy_model: Path, toy_jsonl: Path) -> None:
    scorer = load_scorer(toy_model)
    prompts = [r.prompt for r in load_jsonl(toy_jsonl)][:40]
    expected = [scorer.score([p])[0] for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: scorer.score([p])[0], prompts))
    assert got == pytest.approx(expected, abs=1e-5)
    assert scorer.score([]) == []


def test_toy_model_separates_hard_from_easy(toy_model: Path, toy_jsonl: Path) -> None:
    held = [r for r in load_jsonl(toy_jsonl) if r.split == "heldout"]
    scores = load_scorer(toy_model).score([r.prompt for r in held])
    hard = [s for s, r in zip(scores, held, strict=True) if r.scores["small"] == 0]
    easy = [s for s, r in zip(scores, held, strict=True) if r.scores["small"] == 1]
    assert min(hard) > max(easy)


def test_shipped_default_model_loads_and_scores() -> None:
    scorer = load_scorer()
    assert resolve_artifact(DEFAULT_ARTIFACT)[1] == scorer.version
    math_q = ("Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\n"
              "D. 3\nAnswer:")
    (s,) = scorer.score([math_q])
    assert 0.0 <= s <= 1.0 and 0.0 < scorer.threshold < 1.0
