"""ZeroEval's published CRUXEval answers of two models as tier-classifier JSONL.

    python tools/zeroeval_routing.py --repo PATH/TO/ZeroEval --out crux.jsonl
        [--strong gpt-4-turbo-2024-04-09] [--weak Mixtral-8x7B-Instruct-v0.1]
        [--strong-key NAME] [--weak-key NAME] [--limit N] [--seed 0]

Reads ``result_dirs/crux/<model>.json`` of a checkout of WildEval/ZeroEval (Apache-2.0):
800 CRUXEval questions (predict a Python function's output) with each model's answer.
An answer is scored as ZeroEval's ``src/evaluation/crux_eval.py`` scores it, with the
repository's own parsing helpers (``eval_utils.py``): the ``answer`` of the output's JSON,
quotes stripped, equal to the key as a string. One row per question both models were
asked, task ``crux``. ``--strong-key``/``--weak-key`` store the scores under other names,
so the rows train beside RouteLLM's pair (``classifier loto --data``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from routing_data_cli import run  # tools/, beside this script


def correct(item: dict, model: str, utils) -> float:
    """ZeroEval's crux_eval.py verdict on one answer (no answer found: wrong)."""
    text = item["output"][0]
    parsed = utils.extract_first_complete_json(text)
    if parsed is None or "answer" not in parsed:
        parsed = utils.extract_values_from_json(text, allow_no_quotes=True)
    if parsed is None or "answer" not in parsed:
        extracted = utils.model_specific_extraction(model, text)
        if not extracted:
            return 0.0
        parsed = {"answer": extracted}
    model_answer = str(parsed["answer"]).strip("'\"").replace("\n", "\\n")
    key = str(item["answer"]).strip("'\"")
    return float(model_answer == key)


def rows(repo: Path, strong: str, weak: str, strong_key: str, weak_key: str) -> list[dict]:
    sys.path.insert(0, str(repo / "src" / "evaluation"))
    import eval_utils  # ZeroEval's own answer parsing

    answers = {}
    for model in (strong, weak):
        data = json.loads((repo / "result_dirs" / "crux" / f"{model}.json").read_text())
        answers[model] = {item["session_id"]: item for item in data}
    out = []
    for sid in sorted(answers[strong].keys() & answers[weak].keys()):
        s, w = answers[strong][sid], answers[weak][sid]
        out.append({"prompt": w["question"], "task": "crux", "group": "crux",
                    "scores": {strong_key: correct(s, strong, eval_utils), weak_key: correct(w, weak, eval_utils)}})
    return out


def main() -> int:
    return run(__doc__, "a checkout of WildEval/ZeroEval", "gpt-4-turbo-2024-04-09", "Mixtral-8x7B-Instruct-v0.1", rows)


if __name__ == "__main__":
    raise SystemExit(main())
