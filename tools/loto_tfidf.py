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

import numpy as np
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from tqdm import tqdm

from kvroute.classifier.data import question_text
from kvroute.classifier.loto import UNITS, Folds, layer_features, variant_table

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
    folds = Folds()
    texts = [question_text(r.prompt) for r in folds.recs]
    emb = layer_features(list(folds.prompts), [0])[:, :384]  # the shipped features, no surface ones
    apgr = folds.fit_apgr

    rows: dict[str, dict[str, float]] = {}
    for u in tqdm(UNITS, desc="units left out"):
        train, test = folds.split(u)
        rows.setdefault("random", {})[u] = folds.random(test)
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
