"""MMLU-Pro's published per-question answers of two models as tier-classifier JSONL.

    python tools/mmlu_pro_routing.py --repo PATH/TO/MMLU-Pro --out mmlu_pro.jsonl
        [--strong gemini-1.5-pro-002] [--weak Mixtral-8x7B-Instruct-v0.1]
        [--strong-key NAME] [--weak-key NAME] [--limit N] [--seed 0]

Reads ``eval_results/model_outputs_<model>_5shots.zip`` of a checkout of
TIGER-AI-Lab/MMLU-Pro (Apache-2.0) and writes one row per question both models answered:
the question with its lettered options, formatted as RouteLLM's MMLU prompts are, and a
0/1 score per model (its extracted answer against the key). Questions MMLU-Pro took from
MMLU (``src`` ``ori_mmlu-*``) are left out: the RouteLLM data already holds MMLU, and the
leave-one-task-out units are its subject groups. The rest come from STEM websites
(``stemez``), TheoremQA and SciBench. ``--strong-key``/``--weak-key`` store the scores
under other names, so the rows train beside RouteLLM's pair (``classifier loto --data``).
"""

from __future__ import annotations

import ast
import json
import zipfile
from pathlib import Path

from routing_data_cli import run  # tools/, beside this script


def answers(repo: Path, model: str) -> dict[str, dict]:
    path = repo / "eval_results" / f"model_outputs_{model}_5shots.zip"
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".json"))
        return {str(q["question_id"]): q for q in json.loads(zf.read(name))}


def prompt_of(q: dict) -> str:
    options = q["options"]
    if isinstance(options, str):
        options = ast.literal_eval(options)
    lines = [q["question"].strip(), *(f"{chr(65 + i)}. {o}" for i, o in enumerate(options)), "Answer:"]
    return "\n".join(lines)


def rows(repo: Path, strong: str, weak: str, strong_key: str, weak_key: str) -> list[dict]:
    s, w = answers(repo, strong), answers(repo, weak)
    out = []
    for qid in sorted(s.keys() & w.keys(), key=int):
        q = w[qid]
        if q["src"].startswith("ori_mmlu"):
            continue
        scores = {strong_key: float(s[qid]["pred"] == s[qid]["answer"]),
                  weak_key: float(q["pred"] == q["answer"])}
        out.append({"prompt": prompt_of(q), "scores": scores, "task": "mmlu_pro", "group": q["category"]})
    return out


def main() -> int:
    return run(__doc__, "a checkout of TIGER-AI-Lab/MMLU-Pro", "gemini-1.5-pro-002", "Mixtral-8x7B-Instruct-v0.1", rows)


if __name__ == "__main__":
    raise SystemExit(main())
