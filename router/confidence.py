"""How confident is a cheap tier's answer? Serving-time rules around the answer scorer.

The trained answer scorer (``classifier/answer.py``) reads question + answer text. vLLM
also gives a few signals for free, which the historical training data does not have
(no logprobs there), so they are rules here, never features of the trained model:

- ``finish_reason == "length"``: the answer was cut off        -> confidence 0
- empty output, or a refusal ("I can't help with that", ...)   -> confidence 0
- a user verifier fails (``regex`` must match, ``json_schema``
  must validate)                                                -> confidence 0
- the request asked for logprobs and the mean token logprob is
  below ``min_mean_logprob``                                    -> confidence 0
- otherwise: the answer scorer's P(correct), or 1.0 without one.

Logprob statistics (mean, min, 10th percentile, count) are computed whenever the response
carries them and returned in ``Verdict.signals`` for logs and tuning.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any

from kvroute.router.config import CascadeConfig
from kvroute.router.errors import ConfigError

log = logging.getLogger(__name__)

_REFUSAL = re.compile(r"^\s*(?:I(?:'m| am) sorry|I can(?:no|')t (?:help|assist|answer)|I(?:'m| am) (?:not able|unable) "
                      r"to|As an AI)", re.IGNORECASE)


@dataclass(frozen=True)
class Answer:
    """What the cascade needs from a cheap response: text, finish reason, token logprobs."""

    text: str
    finish_reason: str | None
    logprobs: tuple[float, ...] | None = None
    ok: bool = True  # False: the try failed (error, unparsable body)


@dataclass(frozen=True)
class Verdict:
    confidence: float
    reason: str  # scorer | rules-only | length | empty | refusal | verifier | logprob | error
    signals: Mapping[str, float] = field(default_factory=dict)


def parse_answer(body: Any) -> Answer:
    """The first choice of a chat or completion response (non-streaming JSON)."""
    try:
        choice = body["choices"][0]
    except (KeyError, IndexError, TypeError):
        return Answer("", None, ok=False)
    msg = choice.get("message")
    text = (msg.get("content") if isinstance(msg, dict) else choice.get("text")) or ""
    if isinstance(msg, dict) and msg.get("tool_calls"):
        text = text or json.dumps(msg["tool_calls"])
    return Answer(str(text), choice.get("finish_reason"), _logprobs(choice.get("logprobs")))


def _logprobs(lp: Any) -> tuple[float, ...] | None:
    if not isinstance(lp, dict):
        return None
    if isinstance(lp.get("content"), list):  # chat
        vals = [t.get("logprob") for t in lp["content"] if isinstance(t, dict)]
    else:  # completions
        vals = lp.get("token_logprobs") or []
    floats = [float(v) for v in vals if isinstance(v, (int, float)) and v > float("-inf")]
    return tuple(floats) if floats else None


def logprob_stats(values: Sequence[float]) -> dict[str, float]:
    s = sorted(values)
    return {"lp_mean": sum(s) / len(s), "lp_min": s[0], "lp_p10": s[int(0.1 * (len(s) - 1))], "lp_n": float(len(s))}


def verify(text: str, verifiers: Sequence[Mapping[str, Any]]) -> str | None:
    """The first failing verifier, described; None when all pass."""
    for i, v in enumerate(verifiers):
        if "regex" in v and not re.search(v["regex"], text):
            return f"verifiers[{i}]: regex did not match"
        if "json_schema" in v:
            import jsonschema  # only needed by configs that use it

            try:
                jsonschema.validate(json.loads(text), v["json_schema"])
            except (ValueError, jsonschema.ValidationError) as exc:
                return f"verifiers[{i}]: {type(exc).__name__}"
    return None


def rules(answer: Answer, verifiers: Sequence[Mapping[str, Any]] = (),
          min_mean_logprob: float | None = None) -> Verdict | None:
    """A verdict of 0 when a rule forces escalation, else None (ask the scorer)."""
    signals = logprob_stats(answer.logprobs) if answer.logprobs else {}
    if not answer.ok:
        return Verdict(0.0, "error", signals)
    if answer.finish_reason == "length":
        return Verdict(0.0, "length", signals)
    if not answer.text.strip():
        return Verdict(0.0, "empty", signals)
    if _REFUSAL.search(answer.text):
        return Verdict(0.0, "refusal", signals)
    if verify(answer.text, verifiers) is not None:
        return Verdict(0.0, "verifier", signals)
    if min_mean_logprob is not None and signals and signals["lp_mean"] < min_mean_logprob:
        return Verdict(0.0, "logprob", signals)
    return None


class AnswerJudge:
    """A cascade model's judge of cheap answers: the rules above, then the answer scorer."""

    def __init__(self, model: str, cfg: CascadeConfig, executor: Executor | None):
        self.model, self.cfg, self.executor = model, cfg, executor
        self.scorer: Any = None  # classifier.answer.AnswerScorer; None: rules only

    async def load(self) -> None:
        if self.cfg.answer_model == "rules":
            return
        from kvroute.classifier.answer import load_answer_scorer  # the encoder loads only here

        try:
            self.scorer = await asyncio.get_running_loop().run_in_executor(
                self.executor, load_answer_scorer, self.cfg.answer_model)
        except Exception as exc:
            raise ConfigError(f"models[{self.model}].cascade.answer_model",
                              f"cannot load the answer scorer: {exc}") from exc
        log.info("model %s: cascade answer scorer %s loaded (threshold %s)", self.model, self.scorer.version,
                 self.cfg.threshold)

    async def confidence(self, question: str, answer: Answer, probe: bool = False) -> Verdict:
        if probe and answer.finish_reason == "length":  # a probe is cut off by design
            answer = replace(answer, finish_reason=None)
        verdict = rules(answer, self.cfg.verifiers, self.cfg.min_mean_logprob)
        if verdict is not None:
            return verdict
        signals = logprob_stats(answer.logprobs) if answer.logprobs else {}
        if self.scorer is None:
            return Verdict(1.0, "rules-only", signals)
        scores = await asyncio.get_running_loop().run_in_executor(
            self.executor, self.scorer.score, [question], [answer.text])
        return Verdict(float(scores[0]), "scorer", signals)
