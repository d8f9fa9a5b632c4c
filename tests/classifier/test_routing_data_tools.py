"""The converters of public routing data (tools/mmlu_pro_routing.py, tools/zeroeval_routing.py)
on small repositories laid out as the real ones are."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def run(tool: str, *args: str) -> None:
    subprocess.run([sys.executable, str(TOOLS / tool), *args], check=True, capture_output=True)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mmlu_pro_rows_leave_out_mmlus_own_questions(tmp_path: Path) -> None:
    questions = [
        {"question_id": 1, "question": "What is 2+2? ", "options": "['3', '4']", "answer": "B",
         "category": "math", "src": "theoremQA-Math"},
        {"question_id": 2, "question": "Capital of France?", "options": ["Paris", "Rome"], "answer": "A",
         "category": "other", "src": "ori_mmlu-geography"},
        {"question_id": 3, "question": "Unit of force?", "options": ["newton", "joule"], "answer": "A",
         "category": "physics", "src": "stemez-Physics"},
    ]
    preds = {"gemini-1.5-pro-002": {1: "B", 2: "A", 3: "A"}, "Mixtral-8x7B-Instruct-v0.1": {1: "A", 2: "A", 3: None}}
    (tmp_path / "eval_results").mkdir()
    for model, by_id in preds.items():
        with zipfile.ZipFile(tmp_path / "eval_results" / f"model_outputs_{model}_5shots.zip", "w") as zf:
            zf.writestr(f"model_outputs_{model}_5shots.json",
                        json.dumps([{**q, "pred": by_id[q["question_id"]]} for q in questions]))
    out = tmp_path / "pro.jsonl"
    run("mmlu_pro_routing.py", "--repo", str(tmp_path), "--out", str(out), "--strong-key", "big", "--weak-key", "small")
    got = rows(out)
    assert [r["group"] for r in got] == ["math", "physics"]  # the MMLU question is left out
    assert got[0]["prompt"] == "What is 2+2?\nA. 3\nB. 4\nAnswer:"
    assert got[0]["scores"] == {"big": 1.0, "small": 0.0} and got[1]["scores"] == {"big": 1.0, "small": 0.0}
    assert all(r["task"] == "mmlu_pro" for r in got)


def test_zeroeval_crux_answers_are_scored_with_the_repositorys_parser(tmp_path: Path) -> None:
    evaluation = tmp_path / "src" / "evaluation"
    evaluation.mkdir(parents=True)
    # the repository's helpers, reduced to what the converter calls
    (evaluation / "eval_utils.py").write_text(
        "import json\n"
        "def extract_first_complete_json(s):\n"
        "    try:\n        return json.loads(s)\n    except ValueError:\n        return None\n"
        "def extract_values_from_json(s, allow_no_quotes=False):\n    return {}\n"
        "def model_specific_extraction(model, s):\n    return None\n")
    crux = tmp_path / "result_dirs" / "crux"
    crux.mkdir(parents=True)
    items = [("crux-test-#0", "f(1) == ?", "2"), ("crux-test-#1", "g('a') == ?", "'ab'")]
    outputs = {"gpt-4-turbo-2024-04-09": ['{"answer": "2"}', '{"answer": "\'ab\'"}'],
               "Mixtral-8x7B-Instruct-v0.1": ['{"answer": "3"}', "no json here"]}
    for model, outs in outputs.items():
        (crux / f"{model}.json").write_text(json.dumps([
            {"session_id": sid, "question": q, "answer": a, "output": [o]} for (sid, q, a), o in zip(items, outs)]))
    out = tmp_path / "crux.jsonl"
    run("zeroeval_routing.py", "--repo", str(tmp_path), "--out", str(out))
    got = rows(out)
    assert [r["prompt"] for r in got] == ["f(1) == ?", "g('a') == ?"]
    assert [r["scores"] for r in got] == [{"gpt-4-turbo-2024-04-09": 1.0, "Mixtral-8x7B-Instruct-v0.1": 0.0}] * 2
