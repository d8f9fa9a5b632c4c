"""Leave-one-task-out APGR of two variants of the default recipe that were not shipped.

    python tools/loto_variants.py [--cache DIR]

- ``ensemble``: the default head's and another recipe's logits, each z-scored on its
  training rows, summed.
- ``pca K``: the embedding projected on its top K principal components (fitted on each
  fold's training rows) before the default ``gain_within`` fit; ``pca nested`` picks K per
  fold by an inner leave-one-task-out over that fold's training units, so the unit left
  out never chooses it.

Same units, data and scoring as ``kvroute classifier loto`` (classifier/loto.py).
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from kvroute.classifier.loto import RECIPES, UNITS, Folds, fit_recipe, layer_features, variant_table

KS = (64, 96, 128, 160, 192, 256)
ENSEMBLES = ("logreg", "gain", "mf", "old-default")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", help="embedding cache dir (as classifier loto --cache)")
    args = p.parse_args()
    folds = Folds()
    recs, strong, weak = folds.recs, folds.strong, folds.weak
    x = layer_features(list(folds.prompts), [0], args.cache)
    emb = x[:, :384]
    on_projection = dataclasses.replace(RECIPES["default"], surface=True)  # its features: all columns given

    def pca_apgr(train: np.ndarray, test: np.ndarray, k: int) -> float:
        mean = emb[train].mean(0)
        proj = np.linalg.svd(emb[train] - mean, full_matrices=False)[2][:k].T
        a, b = (emb[train] - mean) @ proj, (emb[test] - mean) @ proj
        head = fit_recipe(on_projection, a, [recs[i] for i in train], strong, weak)
        return folds.apgr(head.logits(b).ravel(), test)

    def z_logits(name: str, train: np.ndarray, test: np.ndarray) -> np.ndarray:
        recipe = RECIPES[name]
        head = fit_recipe(recipe, x[train], [recs[i] for i in train], strong, weak)
        fit, out = head.logits(recipe.features(x[train])), head.logits(recipe.features(x[test]))
        return ((out - fit.mean()) / fit.std()).ravel()

    rows: dict[str, dict[str, float]] = {}
    for u in UNITS:
        train, test = folds.split(u)
        rows.setdefault("random", {})[u] = folds.random(test)
        base = z_logits("default", train, test)
        rows.setdefault("default", {})[u] = folds.apgr(base, test)
        for other in ENSEMBLES:
            rows.setdefault(f"ensemble: default + {other}", {})[u] = folds.apgr(base + z_logits(other, train, test),
                                                                               test)
        for k in KS:
            rows.setdefault(f"pca {k}", {})[u] = pca_apgr(train, test, k)
        inner = {k: np.mean([pca_apgr(*folds.split(v, train), k) for v in UNITS if v != u]) for k in KS}
        best = max(KS, key=lambda k: inner[k])
        rows.setdefault("pca nested (K chosen per fold)", {})[u] = pca_apgr(train, test, best)
        print(f"{u}: nested LOTO chose K={best}", flush=True)
    print("\n" + variant_table(rows, "variant"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
