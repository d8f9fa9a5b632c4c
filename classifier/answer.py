"""Answer scorer for cascades: P(the cheap tier's answer is correct | prompt, answer).

FrugalGPT-style: read the question and the cheap model's answer and predict whether the
answer is right, so that a router can keep good cheap answers and escalate the others.
The features are the same cheap encoder the tier classifier uses (MiniLM's embedding
layer, mean-pooled) applied to ``question [SEP] answer``, plus a handful of answer
features that embeddings blur: length, a final number, hedging words, repeated lines,
arithmetic steps that do not check out.  The head is the classifier's ridge+Platt head
(``classifier.head.fit_gain`` on the 0/1 label), stored as a KB-size ``head.npz``.

Training data: RouteLLM's GSM8K file carries the weak model's (Mixtral) full answers and
their correctness; the split is the classifier's fixed one (``classifier.data``), so the
held-out prompts are never trained on.  The historical answers carry **no logprobs**;
logprob statistics are therefore serving-time rules only (``router/confidence.py``), not
features of this model.

API (sync, thread-safe; the router runs it in an executor)::

    scorer = load_answer_scorer(path)        # default: artifacts/answer-default
    scorer.score(questions, answers) -> list[float]
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvroute.classifier.artifact import new_version, read_metadata, resolve_artifact, write_metadata
from kvroute.classifier.data import (
    ROUTELLM_STRONG,
    ROUTELLM_WEAK,
    _contaminated,
    _norm,
    _truthy,
    assign_split,
    data_dir,
    question_text,
)
from kvroute.classifier.encoder import Encoder, EncoderConfig
from kvroute.classifier.head import Head, fit_gain

DEFAULT_ANSWER_ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "answer-default"
SEP = " [SEP] "
N_ANSWER_FEATURES = 10
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_FINAL = re.compile(r"(?:answer|total|therefore|so|thus)[^\n]{0,40}?(-?\$?\d[\d,]*(?:\.\d+)?)\s*\S{0,12}\s*$",
                    re.IGNORECASE)
_HEDGE = re.compile(r"\b(?:maybe|perhaps|probably|might|not sure|unclear|assum\w*|approximately|"
                    r"I think|it seems|cannot be determined|not enough information|however|"
                    r"wait|actually|mistake|re-?evaluat\w*|let me re\w*)\b", re.IGNORECASE)
_EQUATION = re.compile(r"(-?\d+(?:\.\d+)?)\s*([+\-*x×/])\s*(-?\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class AnswerRecord:
    """One question with the cheap model's answer and whether it was right."""

    question: str
    answer: str
    correct: int
    split: str


def _bad_arithmetic(answer: str) -> float:
    """Share of ``a op b = c`` steps in the answer whose arithmetic is wrong."""
    steps = _EQUATION.findall(answer.replace(",", ""))
    if not steps:
        return 0.0
    bad = 0
    for a, op, b, c in steps:
        x, y, z = float(a), float(b), float(c)
        want = {"+": x + y, "-": x - y, "*": x * y, "x": x * y, "×": x * y}.get(op)
        if op == "/":
            want = x / y if y else None
        if want is None or abs(want - z) > max(1e-6, 0.01 * abs(want)):
            bad += 1
    return bad / len(steps)


def answer_features(question: str, answer: str) -> list[float]:
    """Answer cues, scaled to roughly unit range (see the module docstring)."""
    text = answer.strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    numbers = _NUMBER.findall(text)
    tail = text[-80:]
    return [
        math.log1p(len(text)) / 8,
        math.log1p(len(text)) / 8 - math.log1p(len(question)) / 8,
        float(bool(_FINAL.search(tail))),
        float(bool(_NUMBER.search(tail))),
        min(len(_HEDGE.findall(text)), 5) / 5,
        1 - len(set(lines)) / max(len(lines), 1),  # repeated lines: a looping answer
        math.log1p(len(numbers)) / 4,
        _bad_arithmetic(text),
        float(len(set(_NUMBER.findall(tail))) > 1),  # more than one candidate near the end
        float(not text),
    ]


class AnswerScorer:
    """Encoder (question [SEP] answer) + answer features -> head -> P(correct)."""

    def __init__(self, encoder: Encoder, head: Head, version: str = "unsaved",
                 metadata: dict | None = None) -> None:
        self.encoder, self.head, self.version = encoder, head, version
        self.metadata = metadata or {}

    def features(self, questions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        qs = [question_text(q) for q in questions]
        texts = [q + SEP + a for q, a in zip(qs, answers, strict=True)]
        emb = self.encoder.embed(texts)
        extra = np.array([answer_features(q, a) for q, a in zip(qs, answers, strict=True)],
                         dtype=np.float32).reshape(len(texts), N_ANSWER_FEATURES)
        return np.concatenate([emb, extra], axis=1)

    def score(self, questions: Sequence[str], answers: Sequence[str]) -> list[float]:
        if not questions:
            return []
        return self.head.predict(self.features(questions, answers)).astype(float).tolist()

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.head.save(out / "head.npz")
        write_metadata(out, {**self.metadata, "version": self.version, "variant": "answer",
                             "encoder_config": self.encoder.config.to_dict()})
        return out


def encoder_config(max_tokens: int = 384) -> EncoderConfig:
    """The cheap encoder on the joined text (question_only off: the answer is the point)."""
    return EncoderConfig(n_layers=0, max_tokens=max_tokens, question_only=False, surface_features=True)


def load_answer_scorer(path: str | Path | None = None, cache_dir: str | None = None) -> AnswerScorer:
    directory, _ = resolve_artifact(path or DEFAULT_ANSWER_ARTIFACT)
    meta = read_metadata(directory)
    if meta.get("variant") != "answer":
        raise ValueError(f"{directory}: not an answer-scorer artifact (variant {meta.get('variant')!r})")
    encoder = Encoder(EncoderConfig.from_dict(meta["encoder_config"]), cache_dir=cache_dir)
    return AnswerScorer(encoder, Head.load(directory / "head.npz"), meta["version"], meta)


def load_gsm8k_answers(model: str = ROUTELLM_WEAK) -> list[AnswerRecord]:
    """RouteLLM GSM8K: ``model``'s answers and correctness, decontaminated, fixed split."""
    root = data_dir() / "routellm" / "gsm8k"
    bad = _contaminated(root / "contaminated_prompts.jsonl")
    out: list[AnswerRecord] = []
    with (root / "gsm8k_responses.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            if _norm(row["prompt"]) in bad:
                continue
            out.append(AnswerRecord(row["prompt"], row[f"{model}_response"], int(_truthy(row[model])),
                                    assign_split("gsm8k", row["prompt"])))
    return out


def load_gsm8k_pairs() -> list[dict]:
    """Held-out-aware rows with both models' correctness and the weak answer (for cascade-eval)."""
    strong = {r.question: r.correct for r in load_gsm8k_answers(ROUTELLM_STRONG)}
    return [{"prompt": r.question, "answer": r.answer, "weak": r.correct, "strong": strong[r.question],
             "split": r.split} for r in load_gsm8k_answers(ROUTELLM_WEAK)]


def train_answer_scorer(records: Sequence[AnswerRecord], l2: float = 0.3, max_tokens: int = 384,
                        encoder: Encoder | None = None, data_name: str = "routellm:gsm8k") -> AnswerScorer:
    encoder = encoder or Encoder(encoder_config(max_tokens))
    scorer = AnswerScorer(encoder, None)  # type: ignore[arg-type]
    x = scorer.features([r.question for r in records], [r.answer for r in records])
    y = np.array([r.correct for r in records], dtype=np.float64)
    scorer.head = fit_gain(x, y, y, l2)
    scorer.version = new_version("answer-")
    scorer.metadata = {"trained_on": len(records), "data": data_name, "label": "weak answer correct",
                       "answer_model": ROUTELLM_WEAK, "l2": l2, "logprob_features": False}
    return scorer


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (rank statistic, ties averaged)."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=int)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    if not pos or not neg:
        return float("nan")
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def evaluate_answers(scorer: AnswerScorer, records: Sequence[AnswerRecord]) -> dict:
    """AUROC, Brier score, and accuracy of kept answers at a few keep rates."""
    p = np.asarray(scorer.score([r.question for r in records], [r.answer for r in records]))
    y = np.array([r.correct for r in records])
    order = np.argsort(-p)
    keep = {}
    for share in (0.25, 0.5, 0.75):
        k = max(1, int(round(share * len(y))))
        keep[f"{share:.0%}"] = float(y[order[:k]].mean())
    surface_only = [answer_features(question_text(r.question), r.answer)[2] for r in records]
    return {"n": len(records), "base_accuracy": float(y.mean()), "auroc": auroc(p, y),
            "brier": float(np.mean((p - y) ** 2)), "accuracy_of_kept": keep,
            "auroc_final_answer_rule_only": auroc(surface_only, y), "version": scorer.version}
