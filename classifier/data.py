"""Labelled routing data: one record per prompt with a score per model.

Everything the classifier trains or evaluates on goes through :class:`Record`, whether
it comes from a user's JSONL logs (``{"prompt": ..., "scores": {model: number}}``) or
from the RouteLLM result files shipped in ``classifier/datasets/routellm`` (Apache-2.0; see
its PROVENANCE.md), which are converted on the fly.
The label "strong tier needed" is derived here, in one place, and so is the fixed
held-out split, so that no code path can train on evaluation prompts by accident.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROUTELLM_STRONG = "gpt-4-1106-preview"
ROUTELLM_WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
ROUTELLM_TASKS = ("mmlu", "gsm8k", "mt_bench")

SPLIT_SEED = "kvroute-classifier-v1"
HELDOUT_FRACTION = 0.3  # of every task but MT-Bench, and of user JSONL without a "split"
CALIB_FRACTION = 0.15  # of the non-held-out rows; used only to set the threshold
SPLITS = ("train", "calib", "heldout")


class DataMissing(FileNotFoundError):
    """The RouteLLM data folder is not there (``$KVROUTE_DATA_DIR`` points elsewhere)."""


@dataclass(frozen=True)
class Record:
    """One prompt with each model's score (0/1 correctness or a graded judge score)."""

    prompt: str
    scores: dict[str, float]
    task: str = "custom"
    group: str = ""
    split: str = ""
    meta: dict[str, str] = field(default_factory=dict, compare=False)


def data_dir() -> Path:
    """The folder holding ``routellm/``: ``$KVROUTE_DATA_DIR``, else the data shipped in the package."""
    env = os.environ.get("KVROUTE_DATA_DIR")
    path = Path(env) if env else Path(__file__).resolve().parent / "datasets"
    if not (path / "routellm").is_dir():
        raise DataMissing(
            f"RouteLLM data not found at {path} (expected {path / 'routellm'}): set "
            "KVROUTE_DATA_DIR to a folder holding routellm/, or unset it to use the data "
            "shipped with kvroute"
        )
    return path


def label(record: Record, strong: str, weak: str, margin: float = 1.0) -> int:
    """1 when the strong tier is needed: strong scores at least ``margin`` above weak.

    With 0/1 correctness and the default margin this means strong right and weak wrong;
    with graded scores (MT-Bench, 1-10) it means a clear win for the strong model.
    """
    return int(record.scores[strong] - record.scores[weak] >= margin)


def _hash_unit(text: str) -> float:
    digest = hashlib.sha256(f"{SPLIT_SEED}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(task: str, prompt: str) -> str:
    """The fixed split of a prompt: a pure function of its task and text.

    A seeded 30% of prompts, by hash, in every task. Holding out whole MMLU subjects
    instead is a harder, cross-domain test (MMLU APGR 0.566 for the ridge head, against
    0.643 on this split); a prompt-level split is what RouteLLM-style baselines quote.
    """
    if task == "mt_bench":
        return "heldout"  # 80 questions: only ever used to test transfer
    held = _hash_unit(prompt) < HELDOUT_FRACTION
    if held:
        return "heldout"
    return "calib" if _hash_unit("calib:" + prompt) < CALIB_FRACTION else "train"


_FEWSHOT_ANSWER = re.compile(r"\nAnswer:[ \t]*\(?[A-Da-d]\)?[^\n]*\n\s*\n")
_MMLU_PREAMBLE = re.compile(r"^The following are multiple choice questions[^\n]*\n\s*\n")


def question_text(prompt: str) -> str:
    """The part of a prompt worth embedding: the last question of a few-shot prompt.

    Five-shot MMLU prompts repeat a long preamble and four solved examples; they dominate
    a mean-pooled embedding, so keep only what follows the last solved example.
    """
    parts = _FEWSHOT_ANSWER.split(prompt)
    text = parts[-1] if len(parts) > 1 else prompt
    return _MMLU_PREAMBLE.sub("", text).strip() or prompt


def _truthy(value: str) -> float:
    return 1.0 if value.strip().lower() in ("true", "1", "1.0") else 0.0


def _contaminated(path: Path) -> set[str]:
    if not path.exists():
        return set()
    with path.open() as fh:
        return {" ".join(json.loads(line)["eval_prompt"].split()) for line in fh if line.strip()}


def _norm(text: str) -> str:
    return " ".join(text.split())


def _iter_mmlu(root: Path) -> Iterator[Record]:
    bad = _contaminated(root / "contaminated_prompts.jsonl")
    for path in sorted(root.glob("mmlu_*.csv")):
        subject = path.stem.removeprefix("mmlu_")
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                if _norm(row["prompt"]) in bad:
                    continue
                scores = {m: _truthy(row[m]) for m in (ROUTELLM_STRONG, ROUTELLM_WEAK)}
                yield Record(row["prompt"], scores, "mmlu", subject)


def _iter_gsm8k(root: Path) -> Iterator[Record]:
    bad = _contaminated(root / "contaminated_prompts.jsonl")
    with (root / "gsm8k_responses.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            if _norm(row["prompt"]) in bad:
                continue
            scores = {m: _truthy(row[m]) for m in (ROUTELLM_STRONG, ROUTELLM_WEAK)}
            yield Record(row["prompt"], scores, "gsm8k", "gsm8k")


def _iter_mt_bench(root: Path) -> Iterator[Record]:
    bad = _contaminated(root / "contaminated_prompts.jsonl")
    with (root / "question.jsonl").open() as fh:
        questions = {q["question_id"]: q for q in map(json.loads, fh) if q}
    judged: dict[tuple[int, int], dict[str, float]] = {}
    with (root / "judgements.jsonl").open() as fh:
        for j in map(json.loads, fh):
            judged.setdefault((j["question_id"], j["turn"]), {})[j["model"]] = float(j["score"])
    for (qid, turn), scores in sorted(judged.items()):
        q = questions[qid]
        if _norm(q["turns"][0]) in bad or len(scores) < 2:
            continue
        prompt = "\n\n".join(q["turns"][:turn])
        yield Record(prompt, scores, "mt_bench", q.get("category", ""),
                     meta={"id": f"{qid}/{turn}"})


def load_routellm(tasks: Iterable[str] = ROUTELLM_TASKS) -> list[Record]:
    """RouteLLM's MMLU, GSM8K and MT-Bench results, decontaminated, with fixed splits."""
    base = data_dir() / "routellm"
    readers = {"mmlu": _iter_mmlu, "gsm8k": _iter_gsm8k, "mt_bench": _iter_mt_bench}
    out: list[Record] = []
    for task in tasks:
        if task not in readers:
            raise ValueError(f"unknown RouteLLM task {task!r}; choose from {ROUTELLM_TASKS}")
        for r in readers[task](base / task):
            out.append(Record(r.prompt, r.scores, r.task, r.group,
                              assign_split(r.task, r.prompt), r.meta))
    return out


def load_jsonl(path: str | Path) -> list[Record]:
    """User logs: one JSON object a line with ``prompt`` and ``scores`` (model -> number).

    Optional keys: ``task``, ``group``, ``split`` (train/calib/heldout; else a fixed
    seeded split by prompt hash).
    """
    out: list[Record] = []
    with Path(path).open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                prompt, scores = obj["prompt"], {k: float(v) for k, v in obj["scores"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{path}:{lineno}: expected {{prompt, scores}}: {exc}") from exc
            task, group = obj.get("task", "custom"), obj.get("group", "")
            split = obj.get("split") or assign_split(task, prompt)
            if split not in SPLITS:
                raise ValueError(f"{path}:{lineno}: split must be one of {SPLITS}")
            out.append(Record(prompt, scores, task, group, split))
    return out


def load(spec: str) -> list[Record]:
    """``routellm`` / ``routellm:mmlu,gsm8k`` for the shipped RouteLLM data, else a JSONL path."""
    if spec == "routellm":
        return load_routellm()
    if spec.startswith("routellm:"):
        return load_routellm(t for t in spec.split(":", 1)[1].split(",") if t)
    return load_jsonl(spec)


def select(records: list[Record], splits: Iterable[str], strong: str, weak: str) -> list[Record]:
    """Records in ``splits`` that score both models; training splits lose any prompt
    that also appears in the held-out split (MMLU repeats a few questions across subjects)."""
    wanted = set(splits)
    held = {r.prompt for r in records if r.split == "heldout"} if "heldout" not in wanted else set()
    return [r for r in records
            if r.split in wanted and strong in r.scores and weak in r.scores
            and r.prompt not in held]


def write_jsonl(records: Iterable[Record], path: str | Path) -> int:
    """Write records in the user JSONL format (with task/group/split kept); returns count."""
    n = 0
    with Path(path).open("w") as fh:
        for r in records:
            obj = {"prompt": r.prompt, "scores": r.scores, "task": r.task,
                   "group": r.group, "split": r.split}
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
    return n
