"""Leave-one-task-out (LOTO) validation: how a training recipe does on traffic it never saw.

A held-out share of prompts from the training tasks says little about a task family the
classifier has never seen, which is what production traffic mostly is. LOTO splits the
RouteLLM data into six units (MMLU's four subject groups, GSM8K and MT-Bench), trains a
recipe on five and scores every prompt of the sixth, in turn. A recipe's figure is the
mean APGR over the six units and its worst unit; the random router goes through the same
code. Training rows whose prompt also appears in the left-out unit are dropped (MMLU
repeats a few questions across subjects).

Prompts are embedded once (with the optional embedding cache), so a recipe costs a few
head fits. Recipes are named in :data:`RECIPES`; ``kvroute classifier loto`` runs them.
``--layers`` compares encoders on the same units: the features are the mean-pooled output
of the given MiniLM layers (0: the embedding layer the shipped models use), side by side.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kvroute.classifier.data import Record
from kvroute.classifier.encoder import N_SURFACE
from kvroute.classifier.head import Head, fit_head
from kvroute.classifier.metrics import random_baseline, summarize

# MMLU's subject -> group map, as in the benchmark's own categories (Hendrycks et al.).
MMLU_GROUPS: dict[str, tuple[str, ...]] = {
    "stem": ("abstract_algebra", "astronomy", "college_biology", "college_chemistry",
             "college_computer_science", "college_mathematics", "college_physics",
             "computer_security", "conceptual_physics", "electrical_engineering",
             "elementary_mathematics", "high_school_biology", "high_school_chemistry",
             "high_school_computer_science", "high_school_mathematics", "high_school_physics",
             "high_school_statistics", "machine_learning"),
    "humanities": ("formal_logic", "high_school_european_history", "high_school_us_history",
                   "high_school_world_history", "international_law", "jurisprudence",
                   "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy",
                   "prehistory", "professional_law", "world_religions"),
    "social_sciences": ("econometrics", "high_school_geography",
                        "high_school_government_and_politics", "high_school_macroeconomics",
                        "high_school_microeconomics", "high_school_psychology", "human_sexuality",
                        "professional_psychology", "public_relations", "security_studies",
                        "sociology", "us_foreign_policy"),
    "other": ("anatomy", "business_ethics", "clinical_knowledge", "college_medicine",
              "global_facts", "human_aging", "management", "marketing", "medical_genetics",
              "miscellaneous", "nutrition", "professional_accounting", "professional_medicine",
              "virology"),
}
_GROUP_OF = {s: g for g, subjects in MMLU_GROUPS.items() for s in subjects}
UNITS = ("mmlu:stem", "mmlu:humanities", "mmlu:social_sciences", "mmlu:other", "gsm8k", "mt_bench")


def unit_of(record: Record) -> str:
    """The LOTO unit of a record: ``mmlu:<group>`` for MMLU, else its task."""
    if record.task == "mmlu":
        return f"mmlu:{_GROUP_OF.get(record.group, 'other')}"
    return record.task


@dataclass(frozen=True)
class Recipe:
    """How to train a head on frozen features (the flags of ``classifier train``)."""

    name: str
    head: str = "gain_knn"
    task_balance: float = 0.5
    surface: bool = True  # the six surface features after the embedding(s)
    l2: float | None = None
    note: str = ""

    def features(self, x: np.ndarray) -> np.ndarray:
        return x if self.surface else x[:, :-N_SURFACE]


RECIPES = {r.name: r for r in (
    Recipe("default", "gain_within", 0.25, False, None,
           "ridge on strong - weak within each task, lightly task-balanced (the shipped default)"),
    Recipe("within-l2-0.6", "gain_within", 0.25, False, 0.6, "the same, l2 0.6"),
    Recipe("within-unbalanced", "gain_within", 0.0, False, None, "the same, rows weighed equally"),
    Recipe("old-default", "gain_knn", 0.5, True, None,
           "gain + neighbours + surface features, task-balanced (the former shipped default)"),
    Recipe("logreg", "logreg", 0.0, False, None,
           "frozen embedding + logistic regression on the 0/1 label, rows weighed equally"),
    Recipe("gain", "gain", 0.5, False, None, "ridge on strong - weak, task-balanced"),
    Recipe("gain-surface", "gain", 0.5, True, None, "the same with surface features"),
    Recipe("mf", "mf", 0.5, False, None, "RouteLLM matrix factorisation (one model pair)"),
    Recipe("logreg-balanced", "logreg", 0.5, False, None, "logreg, task-balanced"),
    Recipe("logreg-strong-l2", "logreg", 0.5, False, 0.1, "logreg, task-balanced, l2 0.1"),
    Recipe("logreg-weak-l2", "logreg", 0.5, False, 1e-3, "logreg, task-balanced, l2 0.001"),
    Recipe("logreg-full-balance", "logreg", 1.0, False, None, "logreg, tasks weigh the same"),
)}


def layer_features(prompts: Sequence[str], layers: Sequence[int],
                   cache_dir: str | Path | None = None) -> np.ndarray:
    """Features for LOTO: each layer's pooled embedding (384 columns, L2-normalised, in the
    order given; 0 is the numpy embedding layer, deeper ones need torch), then the six
    surface features. ``layers=[0]`` is what the shipped models read."""
    from kvroute.classifier.encoder import Encoder, EncoderConfig
    from kvroute.classifier.train import embed

    blocks = []
    for i, n in enumerate(layers):
        cfg = EncoderConfig(n_layers=n, surface_features=i == len(layers) - 1)
        blocks.append(embed(Encoder(cfg, cache_dir=cache_dir), list(prompts), f"layer {n}"))
    return np.concatenate(blocks, axis=1)


def task_weights(records: Sequence[Record], power: float) -> np.ndarray:
    """The training code's task weights (imported late: train.py pulls in tqdm bars)."""
    from kvroute.classifier.train import task_weights as tw

    return tw(list(records), power)


def fit_recipe(recipe: Recipe, x: np.ndarray, records: Sequence[Record], strong: str,
               weak: str, margin: float = 1.0) -> Head:
    """Fit ``recipe``'s head on features ``x`` (embedding(s) + surface) of ``records``."""
    from kvroute.classifier.train import gains, labels

    return fit_head(recipe.features(x), labels(list(records), strong, weak, margin),
                    kind=recipe.head, l2=recipe.l2, gain=gains(list(records), strong, weak, margin),
                    weight=task_weights(records, recipe.task_balance),
                    groups=np.array([r.task for r in records]))


def loto(records: Sequence[Record], x: np.ndarray, recipes: Sequence[Recipe], strong: str,
         weak: str, units: Sequence[str] = UNITS, layers: Sequence[int] = (0,)) -> dict:
    """Per-unit APGR of each recipe, trained on the other units; plus the random router.

    ``x``: the features of :func:`layer_features` for ``layers`` (recorded in the result).
    """
    unit = np.array([unit_of(r) for r in records])
    prompts = [r.prompt for r in records]
    out: dict = {"units": list(units), "n_prompts": {u: int((unit == u).sum()) for u in units},
                 "layers": list(layers), "models": {}}
    rand: dict[str, float] = {}
    for u in units:
        test = np.nonzero(unit == u)[0]
        sq = [records[i].scores[strong] for i in test]
        wq = [records[i].scores[weak] for i in test]
        rand[u] = float(random_baseline(sq, wq)["apgr"])
    out["models"]["random"] = _summary(rand, rand, "uniform random scores, 20 seeds")
    for recipe in recipes:
        per_unit: dict[str, float] = {}
        for u in units:
            test = np.nonzero(unit == u)[0]
            held = {prompts[i] for i in test}
            train = [i for i in np.nonzero(unit != u)[0] if prompts[i] not in held]
            head = fit_recipe(recipe, x[train], [records[i] for i in train], strong, weak)
            s = head.predict(recipe.features(x[test]))
            per_unit[u] = float(summarize(s, [records[i].scores[strong] for i in test],
                                          [records[i].scores[weak] for i in test])["apgr"])
        out["models"][recipe.name] = _summary(per_unit, rand, recipe.note, asdict(recipe))
    return out


class Folds:
    """RouteLLM's pair (GPT-4 against Mixtral) in LOTO units, for the experiments in
    ``tools/loto_*.py`` that swap the features or pooling rather than the recipe."""

    def __init__(self) -> None:
        from kvroute.classifier.data import ROUTELLM_STRONG, ROUTELLM_WEAK, load

        self.strong, self.weak = ROUTELLM_STRONG, ROUTELLM_WEAK
        self.recs = [r for r in load("routellm") if self.strong in r.scores and self.weak in r.scores]
        self.unit = np.array([unit_of(r) for r in self.recs])
        self.prompts = np.array([r.prompt for r in self.recs], dtype=object)
        self.sq = np.array([r.scores[self.strong] for r in self.recs])
        self.wq = np.array([r.scores[self.weak] for r in self.recs])
        self.everything = np.arange(len(self.recs))

    def split(self, u: str, pool: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(train, test) row indices of ``pool`` (all rows by default) with unit ``u`` left
        out; training drops rows whose prompt is also in the unit."""
        pool = self.everything if pool is None else pool
        test = pool[self.unit[pool] == u]
        held = set(self.prompts[test])
        return np.array([i for i in pool[self.unit[pool] != u] if self.prompts[i] not in held]), test

    def apgr(self, scores: np.ndarray, test: np.ndarray) -> float:
        return float(summarize(scores, self.sq[test], self.wq[test])["apgr"])

    def random(self, test: np.ndarray) -> float:
        return float(random_baseline(list(self.sq[test]), list(self.wq[test]))["apgr"])

    def fit(self, x: np.ndarray, train: np.ndarray, recipe: str = "default") -> Head:
        """``recipe``'s head fitted on every column of ``x`` (no surface columns dropped)."""
        from dataclasses import replace

        return fit_recipe(replace(RECIPES[recipe], surface=True), x[train], [self.recs[i] for i in train],
                          self.strong, self.weak)

    def fit_apgr(self, x: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
        """APGR on ``test`` of the default recipe fitted on ``x[train]``."""
        return self.apgr(self.fit(x, train).logits(x[test]).ravel(), test)


def _summary(per_unit: dict[str, float], rand: dict[str, float], note: str,
             recipe: dict | None = None) -> dict:
    worst = min(per_unit, key=lambda u: per_unit[u])
    return {"per_unit": per_unit, "mean": float(np.mean(list(per_unit.values()))),
            "worst": per_unit[worst], "worst_unit": worst,
            "below_random": [u for u, v in per_unit.items() if v < rand[u]],
            "note": note, **({"recipe": recipe} if recipe else {})}


def variant_table(rows: dict[str, dict[str, float]], label: str, units: Sequence[str] = UNITS) -> str:
    """A Markdown table of APGR per unit left out for named variants (the tools' output);
    ``rows["random"]`` marks the units where a variant is below the random router."""
    lines = [f"| {label} | " + " | ".join(units) + " | mean | worst |", "|---" * (len(units) + 3) + "|"]
    for name, per in rows.items():
        cells = " | ".join(f"{per[u]:.3f}" for u in units)
        below = [u for u in units if name != "random" and per[u] < rows["random"][u]]
        note = f" (below random: {', '.join(below)})" if below else ""
        lines.append(f"| {name} | {cells} | {np.mean(list(per.values())):.3f} | {min(per.values()):.3f}{note} |")
    return "\n".join(lines)


def markdown(res: dict) -> str:
    units = res["units"]
    head = "| model | " + " | ".join(f"{u} (n={res['n_prompts'][u]})" for u in units)
    lines = [head + " | mean | worst |", "|---" * (len(units) + 3) + "|"]
    for name, m in res["models"].items():
        cells = " | ".join(f"{m['per_unit'][u]:.3f}" for u in units)
        lines.append(f"| {name} | {cells} | {m['mean']:.3f} | {m['worst']:.3f} ({m['worst_unit']}) |")
    return "\n".join(lines) + "\n"


def write(res: dict, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loto.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "loto.md").write_text(markdown(res))
    return out
