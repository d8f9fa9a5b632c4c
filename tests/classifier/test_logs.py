"""Labels from the router's prompt logs, and ``refresh --from-logs`` promoting on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvroute.classifier.artifact import resolve_artifact
from kvroute.classifier.cli import main
from kvroute.classifier.data import ROUTELLM_STRONG as S
from kvroute.classifier.data import ROUTELLM_WEAK as W
from kvroute.classifier.logs import read_feedback, read_prompt_logs

DATA = Path(__file__).parent / "data"
LOGS = DATA / "promptlogs"


def _labels(result) -> dict[str, int]:
    return {r.prompt: int(r.scores[W] == 0.0) for r in result.records}


def test_labels_follow_the_cascade_and_the_cheapest_tier() -> None:
    res = read_prompt_logs(LOGS, S, W)
    assert _labels(res) == {
        "What is the capital of France?": 0,  # the cascade kept the cheap answer
        "Prove that there are infinitely many primes.": 1,  # it escalated and kept the strong one
        "Name a primary colour.": 0,  # no cascade, answered by the cheapest tier ("small")
        "Integrate x^2 sin x.": 1,
        "2 + 2 =": 0,  # a text completion's prompt
    }
    c = res.counts
    assert (c["skipped_status"], c["skipped_schema"], c["skipped_no_prompt"]) == (1, 1, 1)
    assert c["skipped_unlabelled"] == 1  # the strong tier without a cascade says nothing
    assert c["skipped_unreadable"] == 1  # the torn last line
    assert {r.task for r in res.records} == {"logs"} and {r.group for r in res.records} == {"auto"}
    assert res.summary()["label_1"] == 2


def test_without_cascade_rows_the_cheap_tier_must_be_named(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (LOGS / "prompts.jsonl.1").read_text().splitlines()]
    (tmp_path / "p.jsonl").write_text(json.dumps(rows[2]) + "\n")  # "small", no cascade
    assert read_prompt_logs(tmp_path, S, W).records == []
    assert len(read_prompt_logs(tmp_path, S, W, cheap_tier="small").records) == 1


def test_feedback_overrides_by_trace_id_or_prompt_and_adds_prompts() -> None:
    res = read_prompt_logs(LOGS, S, W, feedback=DATA / "feedback.jsonl")
    labels = _labels(res)
    assert labels["Integrate x^2 sin x."] == 0  # by trace id
    assert labels["Name a primary colour."] == 1  # by prompt
    assert labels["Write a sonnet about routers."] == 1  # in no log row
    assert res.counts["feedback"] == 2 and res.counts["feedback_only"] == 1


def test_bad_feedback_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "fb.jsonl"
    bad.write_text('{"trace_id": "ab", "label": 1}\n{"prompt": "x", "label": "yes"}\n')
    with pytest.raises(ValueError, match=r"fb.jsonl:2: expected"):
        read_feedback(bad)


def test_a_folder_without_logs_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no \\*.jsonl prompt logs"):
        read_prompt_logs(tmp_path, S, W)


def _log_line(i: int, prompt: str, hard: bool) -> str:
    """A prompt-log row of a two-tier cascade: hard prompts escalate."""
    cascade = {"tiers": ["small", "large"], "escalated": hard, "kept": "large" if hard else "small",
               "confidence": 0.2 if hard else 0.9}
    return json.dumps({"schema": 1, "time": 1765015200.0 + i, "trace_id": f"{i:032x}", "span_id": None,
                       "model": "auto", "operation": "chat", "tier": cascade["kept"], "upstream_model": "m",
                       "worker": None, "tenant": None, "tags": {},
                       "request": {"messages": [{"role": "user", "content": prompt}]},
                       "response": {"text": "...", "finish_reason": "stop"}, "usage": None, "cost_usd": None,
                       "classifier_score": None, "cascade": cascade, "status": 200, "error_type": None})


def test_refresh_from_logs_promotes_only_a_model_that_beats_the_live_one(
        toy, toy_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    rows = toy.records(240, seed=3)  # math word problems need the strong tier, trivia does not
    lines = [_log_line(i, r["prompt"], r["scores"][toy.weak] == 0.0) for i, r in enumerate(rows)]
    (logs / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    root = tmp_path / "models"
    assert main(["export", "--model", str(toy_model), "--out", str(root), "--pointer", "--version", "v1"]) == 0
    capsys.readouterr()
    assert main(["refresh", "--root", str(root), "--from-logs", str(logs), "--min-gain", "0.5"]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["accepted"] is False and decision["current"] == "v1"  # 0.5 APGR more is out of reach
    assert decision["from_logs"]["records"] == 240 and decision["from_logs"]["label_1"] == 80
    assert main(["refresh", "--root", str(root), "--from-logs", str(logs), "--min-gain", "-1"]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["accepted"] is True and resolve_artifact(root)[1] == decision["candidate_version"]
    assert decision["candidate_apgr"] > 0.7  # judged on the held-out slice of the same logs


def test_refresh_needs_one_source(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="exactly one of --new FILE or --from-logs DIR"):
        main(["refresh", "--root", str(tmp_path)])
    with pytest.raises(SystemExit, match="--feedback goes with --from-logs"):
        main(["refresh", "--root", str(tmp_path), "--new", "x.jsonl", "--feedback", "f.jsonl"])

