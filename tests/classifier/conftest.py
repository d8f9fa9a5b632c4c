"""Fixtures for the classifier tests: tiny synthetic logs and one small trained model.

The synthetic logs have two kinds of prompt: arithmetic word problems, which only the
strong model gets right, and short trivia questions, which both models get right.  A
working classifier separates them easily, so tests can assert real behaviour on ~100
prompts.  The model uses two encoder layers and 64 tokens to keep the suite fast.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvroute.classifier.cli import main
from kvroute.classifier.data import data_dir

STRONG, WEAK = "big", "small"
TRIVIA = ["What colour is the sky on a clear day?", "Which animal says woof?",
          "What is the capital of France?", "How many legs does a cat have?",
          "What do bees make?", "Which season comes after winter?",
          "What is frozen water called?", "Name the star at the centre of our solar system."]
NAMES = ["Janet", "Omar", "Li", "Priya", "Marco", "Sara"]


def math_prompt(rng: random.Random) -> str:
    a, b, c = rng.randint(12, 97), rng.randint(3, 19), rng.randint(2, 9)
    return (f"{rng.choice(NAMES)} buys {a} boxes of {b} pencils, gives away {c} boxes, then "
            f"splits the rest equally among {c + 1} friends. If each pencil costs ${b / 4:.2f}, "
            "how much is each friend's share worth in dollars?")


def synthetic_records(n: int = 120, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        hard = i % 3 == 0
        if hard:
            prompt, scores = math_prompt(rng), {STRONG: 1.0, WEAK: 0.0}
        else:
            prompt = f"{rng.choice(TRIVIA)} (question {i})"
            scores = {STRONG: 1.0, WEAK: 1.0}
        split = ("heldout", "calib", "train", "train", "train")[i % 5]
        rows.append({"prompt": prompt, "scores": scores, "split": split, "task": "toy"})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@dataclass(frozen=True)
class ToyKit:
    """What tests need to make their own toy logs (conftest is not importable as a module)."""

    strong: str = STRONG
    weak: str = WEAK
    records: Callable[..., list[dict]] = staticmethod(synthetic_records)
    write: Callable[[list[dict], Path], Path] = staticmethod(write_jsonl)

    @property
    def args(self) -> list[str]:
        return ["--strong", self.strong, "--weak", self.weak]


@pytest.fixture(scope="session")
def toy() -> ToyKit:
    return ToyKit()


@pytest.fixture(scope="session")
def routellm_data() -> Path:
    """The RouteLLM data shipped with the package."""
    return data_dir()


@pytest.fixture(scope="session")
def toy_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(synthetic_records(), tmp_path_factory.mktemp("data") / "toy.jsonl")


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory: pytest.TempPathFactory, toy_jsonl: Path) -> Path:
    """A frozen-encoder model trained through the CLI on the toy logs."""
    out = tmp_path_factory.mktemp("model") / "toy"
    rc = main(["train", "--data", str(toy_jsonl), "--strong", STRONG, "--weak", WEAK,
               "--out", str(out), "--n-layers", "2", "--max-tokens", "64"])
    assert rc == 0
    return out
