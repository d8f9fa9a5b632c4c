"""Labels from the router's own traffic: prompt logs (and judge or user feedback) as records.

The router's prompt log (``prompt_log`` in the router config; schema 1, one JSON line per
client request, in rotating files ``NAME.jsonl``, ``NAME.jsonl.1``, ...) says which tier's
answer each client got. Where a cascade ran, that is a verdict on the cheap tier:

- the cheap tier's answer was kept (``cascade.escalated`` false, ``kept`` is the first of
  ``cascade.tiers``): the weak tier sufficed, label 0;
- the cascade escalated and kept a stronger tier's answer: the weak tier failed, label 1;
- without a cascade, an answer from the cheapest tier counts as label 0 (the tier's name is
  ``--cheap-tier``, or learned from the cascade rows of the same model); an answer from
  another tier says nothing and is skipped, as are rows with ``status`` other than 200.

Feedback (a judge's or users' verdicts) comes as JSONL, one object a line:
``{"trace_id": "<32 hex>", "label": 0|1}`` or ``{"prompt": "<text>", "label": 0|1}``;
``label`` 1 means the cheap tier's answer was not good enough. Feedback overrides the label
a log row implies (by trace id, else by the prompt the classifier reads); a prompt-keyed
verdict that matches no row adds one.

Each labelled prompt becomes a :class:`~classifier.data.Record` with scores
``{strong: 1, weak: 0}`` (label 1) or ``{strong: 1, weak: 1}`` (label 0), task ``logs``,
group the served model name, and the fixed hash split of :func:`classifier.data.assign_split`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvroute.classifier.data import Record, assign_split

LOG_TASK = "logs"
SCHEMA = 1


@dataclass
class LogLabels:
    """The records read, and why rows were skipped (for the refresh report)."""

    records: list[Record]
    counts: Counter = field(default_factory=Counter)

    def summary(self) -> dict:
        labels = Counter(int(min(r.scores.values()) == 0.0) for r in self.records)
        return {"records": len(self.records), "label_1": labels[1], "label_0": labels[0],
                **dict(sorted(self.counts.items()))}


def log_files(directory: str | Path) -> list[Path]:
    """The prompt-log files in ``directory``: ``*.jsonl`` and their rotated ``*.jsonl.N``."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"--from-logs: {root} is not a directory")
    files = [p for p in sorted(root.iterdir())
             if p.is_file() and (p.suffix == ".jsonl" or ".jsonl." in p.name)]
    if not files:
        raise FileNotFoundError(f"--from-logs: no *.jsonl prompt logs in {root}")
    return files


def _rows(path: Path) -> Iterator[tuple[int, dict | None]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                yield lineno, None  # a torn last line of a file being written
                continue
            yield lineno, obj if isinstance(obj, dict) else None


def _prompt(row: dict) -> str:
    from kvroute.router.tiers import prompt_text  # what the router's classifier reads

    request = row.get("request")
    return prompt_text(request) if isinstance(request, dict) else ""


def _label(row: dict, cheapest: dict[str, str], cheap_tier: str | None) -> tuple[int | None, str]:
    """(label or None, reason) for one log row."""
    if row.get("schema") != SCHEMA:
        return None, "skipped_schema"
    if row.get("status") != 200:
        return None, "skipped_status"
    cascade = row.get("cascade")
    if isinstance(cascade, dict):
        tiers = cascade.get("tiers") or []
        if not tiers:
            return None, "skipped_unlabelled"
        cheap, kept, escalated = tiers[0], cascade.get("kept"), bool(cascade.get("escalated"))
        if not escalated and kept == cheap:
            return 0, "cascade_kept_cheap"
        if escalated and kept is not None and kept != cheap:
            return 1, "cascade_escalated"
        return None, "skipped_unlabelled"
    tier = row.get("tier")
    cheap = cheap_tier or cheapest.get(str(row.get("model")))
    if tier is not None and cheap is not None and tier == cheap:
        return 0, "cheap_tier_answer"
    return None, "skipped_unlabelled"


def _record(prompt: str, label: int, strong: str, weak: str, model: str, meta: dict) -> Record:
    scores = {strong: 1.0, weak: 0.0 if label else 1.0}
    return Record(prompt, scores, LOG_TASK, model, assign_split(LOG_TASK, prompt), meta)


def read_feedback(path: str | Path) -> tuple[dict[str, int], dict[str, int]]:
    """(labels by trace id, labels by prompt) from a feedback JSONL; errors name the line."""
    by_trace: dict[str, int] = {}
    by_prompt: dict[str, int] = {}
    for lineno, obj in _rows(Path(path)):
        where = f"{path}:{lineno}"
        if obj is None or obj.get("label") not in (0, 1):
            raise ValueError(f"{where}: expected {{trace_id or prompt, label: 0 or 1}}")
        if isinstance(obj.get("trace_id"), str):
            by_trace[obj["trace_id"]] = int(obj["label"])
        elif isinstance(obj.get("prompt"), str):
            by_prompt[obj["prompt"]] = int(obj["label"])
        else:
            raise ValueError(f"{where}: needs a string trace_id or prompt")
    return by_trace, by_prompt


def read_prompt_logs(directory: str | Path, strong: str, weak: str, cheap_tier: str | None = None,
                     feedback: str | Path | None = None) -> LogLabels:
    """Labelled records from the prompt logs in ``directory`` (see the module doc)."""
    rows = [(f, n, obj) for f in log_files(directory) for n, obj in _rows(f)]
    counts: Counter = Counter()
    cheapest: dict[str, str] = {}
    for _, _, obj in rows:  # each model's cheapest tier, from its cascade rows
        cascade = obj.get("cascade") if obj else None
        if isinstance(cascade, dict) and cascade.get("tiers"):
            cheapest.setdefault(str(obj.get("model")), cascade["tiers"][0])  # type: ignore[union-attr]
    by_trace, by_prompt = read_feedback(feedback) if feedback else ({}, {})
    out: list[Record] = []
    seen_prompts: set[str] = set()
    for _, _, obj in rows:
        if obj is None:
            counts["skipped_unreadable"] += 1
            continue
        prompt = _prompt(obj)
        if not prompt.strip():
            counts["skipped_no_prompt"] += 1
            continue
        label, reason = _label(obj, cheapest, cheap_tier)
        trace = obj.get("trace_id")
        if isinstance(trace, str) and trace in by_trace:
            label, reason = by_trace[trace], "feedback"
        elif prompt in by_prompt:
            label, reason = by_prompt[prompt], "feedback"
        counts[reason] += 1
        if label is None:
            continue
        seen_prompts.add(prompt)
        out.append(_record(prompt, label, strong, weak, str(obj.get("model", "")),
                           {"trace_id": trace} if isinstance(trace, str) else {}))
    for prompt, label in by_prompt.items():
        if prompt not in seen_prompts:  # a verdict on a prompt the logs do not hold
            counts["feedback_only"] += 1
            out.append(_record(prompt, label, strong, weak, "", {}))
    return LogLabels(out, counts)
