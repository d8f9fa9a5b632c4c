"""Scorers: P(strong tier needed | prompt), with the calibrated threshold beside them.

This is the API the router calls::

    scorer = load_scorer(path)            # artifact dir, or pointer dir with `current`
    scorer.score(prompts) -> list[float]  # sync, thread-safe; run it in an executor
    scorer.threshold                      # score >= threshold -> strong tier
    scorer.version

Two variants share it: ``frozen`` (MiniLM embeddings + a numpy head, the shipped default)
and ``finetuned`` (MiniLM with a sequence-classification head, weights not committed).
torch is imported only when a scorer is loaded.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kvroute.classifier.artifact import read_metadata, resolve_artifact
from kvroute.classifier.data import question_text
from kvroute.classifier.encoder import Encoder, EncoderConfig
from kvroute.classifier.head import Head

__all__ = ["FinetunedScorer", "FrozenScorer", "load_scorer", "resolve_artifact"]
DEFAULT_ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "default"


class FrozenScorer:
    """Frozen encoder + light head; ``score`` batches prompts through both."""

    variant = "frozen"

    def __init__(self, encoder: Encoder, head: Head, threshold: float = 0.5,
                 version: str = "unsaved", metadata: dict | None = None) -> None:
        self.encoder, self.head = encoder, head
        self.threshold, self.version = float(threshold), version
        self.metadata = metadata or {}

    def features(self, prompts: Sequence[str]) -> np.ndarray:
        return self.encoder.embed(prompts)

    def score(self, prompts: Sequence[str]) -> list[float]:
        if not prompts:
            return []
        return self.head.predict(self.features(prompts)).astype(float).tolist()

    @classmethod
    def load(cls, directory: Path, meta: dict, cache_dir: str | None = None) -> FrozenScorer:
        encoder = Encoder(EncoderConfig.from_dict(meta["encoder_config"]), cache_dir=cache_dir)
        return cls(encoder, Head.load(directory / "head.npz"), meta["threshold"],
                   meta["version"], meta)


class FinetunedScorer:
    """MiniLM fine-tuned end to end with a one-logit classification head."""

    variant = "finetuned"

    def __init__(self, model_dir: Path, threshold: float = 0.5, version: str = "unsaved",
                 metadata: dict | None = None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self._torch = torch
        self._lock = threading.Lock()  # the fast tokenizer is not thread-safe
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        self.metadata = metadata or {}
        self.max_tokens = int(self.metadata.get("max_tokens", 256))
        self.question_only = bool(self.metadata.get("question_only", True))
        self.threshold, self.version = float(threshold), version

    def score(self, prompts: Sequence[str], batch_size: int = 32) -> list[float]:
        texts = [question_text(p) for p in prompts] if self.question_only else list(prompts)
        out: list[float] = []
        for start in range(0, len(texts), batch_size):
            with self._lock:
                enc = self.tokenizer(texts[start : start + batch_size], padding=True,
                                     truncation=True, max_length=self.max_tokens,
                                     return_tensors="pt")
            with self._torch.inference_mode():
                logits = self.model(**enc).logits[:, 0].float()
            out.extend(self._torch.sigmoid(logits).tolist())
        return out

    @classmethod
    def load(cls, directory: Path, meta: dict, cache_dir: str | None = None) -> FinetunedScorer:
        return cls(directory / "model", meta["threshold"], meta["version"], meta)


Scorer = FrozenScorer | FinetunedScorer


def load_scorer(path: str | Path | None = None, num_threads: int | None = None,
                cache_dir: str | None = None) -> Scorer:
    """Load the scorer in an artifact dir or behind a pointer dir (default: shipped one).

    ``num_threads`` sets torch's intra-op threads (process-wide) when given;
    ``cache_dir`` enables the offline embedding cache (never for the router).
    """
    directory, _ = resolve_artifact(path or DEFAULT_ARTIFACT)
    meta = read_metadata(directory)
    if num_threads:
        import torch

        torch.set_num_threads(num_threads)
    variants = {"frozen": FrozenScorer, "finetuned": FinetunedScorer}
    if meta.get("variant") not in variants:
        raise ValueError(f"{directory}: unknown classifier variant {meta.get('variant')!r}")
    return variants[meta["variant"]].load(directory, meta, cache_dir)
