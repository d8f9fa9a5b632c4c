"""Refresh keeps the better model (by held-out APGR) and swaps the pointer atomically."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kvroute.classifier.artifact import resolve_artifact, swap_pointer
from kvroute.classifier.data import load_jsonl, select
from kvroute.classifier.encoder import EncoderConfig
from kvroute.classifier.head import Head
from kvroute.classifier.model import FrozenScorer
from kvroute.classifier.refresh import consider
from kvroute.classifier.train import save, train_frozen

STRONG, WEAK = "big", "small"  # the toy logs' model names (see conftest)
CONFIG = EncoderConfig(n_layers=2, max_tokens=64)


@pytest.fixture(scope="module")
def scorers(toy_jsonl: Path) -> tuple[FrozenScorer, FrozenScorer, list]:
    recs = load_jsonl(toy_jsonl)
    good = train_frozen(select(recs, ["train"], STRONG, WEAK), STRONG, WEAK, CONFIG)
    h = good.head  # the same model with its decision reversed: strictly worse
    bad = FrozenScorer(good.encoder, Head(h.mean, h.std, -h.w1, -h.b1), 0.5,
                       good.version + "-reversed", {**good.metadata})
    return good, bad, select(recs, ["heldout"], STRONG, WEAK)


def test_rejects_worse_then_accepts_better(scorers: tuple, tmp_path: Path) -> None:
    good, bad, held = scorers
    root = tmp_path / "models"
    first = consider(root, good, held, STRONG, WEAK)
    assert first["accepted"] and first["live_version"] is None
    assert resolve_artifact(root)[1] == good.version
    second = consider(root, bad, held, STRONG, WEAK)
    assert not second["accepted"] and second["candidate_apgr"] < second["live_apgr"]
    assert resolve_artifact(root)[1] == good.version  # pointer untouched
    assert not (root / bad.version).exists()

    root2 = tmp_path / "models2"
    consider(root2, bad, held, STRONG, WEAK)
    third = consider(root2, good, held, STRONG, WEAK)
    assert third["accepted"] and third["live_version"] == bad.version
    assert resolve_artifact(root2)[1] == good.version
    meta = (resolve_artifact(root2)[0] / "metadata.json").read_text()
    assert '"accepted_with"' in meta and '"replaced"' in meta


def test_min_gain_blocks_equal_model(scorers: tuple, tmp_path: Path) -> None:
    good, _, held = scorers
    consider(tmp_path, good, held, STRONG, WEAK)
    again = consider(tmp_path, good, held, STRONG, WEAK, min_gain=0.0)
    assert not again["accepted"]  # equal is not better


def test_swap_is_atomic_for_concurrent_readers(scorers: tuple, tmp_path: Path) -> None:
    good, _, _ = scorers
    for name in ("a", "b"):
        save(FrozenScorer(good.encoder, good.head, 0.5, name, dict(good.metadata)), tmp_path / name)
    swap_pointer(tmp_path, "a")
    seen: set[str] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.add(resolve_artifact(tmp_path)[1])
            except BaseException as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(exc)
                return

    t = threading.Thread(target=reader)
    t.start()
    for i in range(300):
        swap_pointer(tmp_path, "ab"[i % 2])
    stop.set()
    t.join()
    assert not errors and seen <= {"a", "b"} and seen
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".current")]
    with pytest.raises(FileNotFoundError):
        swap_pointer(tmp_path, "missing")
