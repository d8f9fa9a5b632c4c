"""Leave-one-task-out APGR of bag-of-words features beside (or instead of) the embedding layer.

    python tools/loto_tfidf.py [--dims 128,384]

For each unit left out, a TF-IDF vectoriser is fitted on the fold's training prompts (the
question of each, as the shipped encoder reads it), reduced to ``--dims`` dimensions by a
truncated SVD fitted on the same prompts, L2-normalised, and fed to the default
``gain_within`` fit alone (``word12 128``) or after the shipped embedding (``emb + word12
128``). Vectorisers: ``word12`` (words and word pairs), ``char25`` (character 2- to
5-grams within words), ``word1+punct`` (single words and punctuation marks).

Same units, data and scoring as ``kvroute classifier loto`` (classifier/loto.py). Needs
scikit-learn (``pip install 'kvroute[classifier]'`` brings it with sentence-transformers).
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from tqdm import tqdm

from kvroute.classifier.data import ROUTELLM_STRONG, ROUTELLM_WEAK, load, question_text
from kvroute.classifier.loto import RECIPES, UNITS, fit_recipe, layer_features, unit_of, variant_table
from kvroute.classifier.metrics import random_baseline, summarize

VECTORISERS = {
    "word12": dict(analyzer="word", ngram_range=(1, 2), min_df=3, sublinear_tf=True, max_features=50000),
    "char25": dict(analyzer="char_wb", ngram_range=(2, 5), min_df=5, sublinear_tf=True, max_features=80000),
    "word1+punct": dict(analyzer="word", ngram_range=(1, 1), min_df=3, sublinear_tf=True,
                        token_pattern=r"(?u)\b\w+\b|[^\w\s]"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="128,384", help="SVD dimensions, comma-separated")
    args = p.parse_args()
    dims = [int(k) for k in args.dims.split(",")]
    recs = [r for r in load("routellm") if ROUTELLM_STRONG in r.scores and ROUTELLM_WEAK in r.scores]
    texts = [question_text(r.prompt) for r in recs]
    emb = layer_features([r.prompt for r in recs], [0])[:, :384]  # the shipped features, no surface ones
    unit = np.array([unit_of(r) for r in recs])
    prompts = np.array([r.prompt for r in recs], dtype=object)
    sq = np.array([r.scores[ROUTELLM_STRONG] for r in recs])
    wq = np.array([r.scores[ROUTELLM_WEAK] for r in recs])
    recipe = dataclasses.replace(RECIPES["default"], surface=True)  # its features: all columns given

    def apgr(x: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
        head = fit_recipe(recipe, x[train], [recs[i] for i in train], ROUTELLM_STRONG, ROUTELLM_WEAK)
        return float(summarize(head.logits(x[test]).ravel(), sq[test], wq[test])["apgr"])

    rows: dict[str, dict[str, float]] = {}
    for u in tqdm(UNITS, desc="units left out"):
        test = np.nonzero(unit == u)[0]
        held = set(prompts[test])
        train = np.array([i for i in np.nonzero(unit != u)[0] if prompts[i] not in held])
        rows.setdefault("random", {})[u] = float(random_baseline(list(sq[test]), list(wq[test]))["apgr"])
        rows.setdefault("embedding layer (shipped)", {})[u] = apgr(emb, train, test)
        for name, options in VECTORISERS.items():
            counts = TfidfVectorizer(**options).fit([texts[i] for i in train]).transform(texts)
            for k in dims:
                z = TruncatedSVD(k, random_state=0).fit(counts[train]).transform(counts)
                z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
                rows.setdefault(f"{name} {k}", {})[u] = apgr(z, train, test)
                rows.setdefault(f"emb + {name} {k}", {})[u] = apgr(np.hstack([emb, z]), train, test)
    print("\n" + variant_table(rows, "features"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
