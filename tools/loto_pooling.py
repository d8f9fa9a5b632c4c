"""Leave-one-task-out APGR of token-weighted pooling in place of the embedding layer's mean.

    python tools/loto_pooling.py [--weights 3e-5,5e-5,1e-4,2e-4,5e-4]

The shipped encoder mean-pools MiniLM's embedding layer over a prompt's tokens. Here each
token is weighed by how common it is, with the token frequencies ``p`` counted on the
fold's training prompts only, before the default ``gain_within`` fit:

- ``rare a``: weight a / (a + p), the smooth inverse frequency of Arora et al. (2017),
  which stresses content words;
- ``common a``: weight p / (a + p), which stresses function words and punctuation;
- ``common nested``: ``a`` picked per fold by an inner leave-one-task-out over that fold's
  training units, so the unit left out never chooses it.

Same units, data and scoring as ``kvroute classifier loto`` (classifier/loto.py).
"""

from __future__ import annotations

import argparse

import numpy as np
from tqdm import tqdm

from kvroute.classifier.data import question_text
from kvroute.classifier.encoder import EmbeddingLayer
from kvroute.classifier.loto import UNITS, Folds, variant_table


class Tokens:
    """Every prompt's embedding-layer outputs, one row per token, kept for re-pooling."""

    def __init__(self, texts: list[str]) -> None:
        layer = EmbeddingLayer(256)
        encs = layer.tokenizer.encode_batch(texts)
        self.ids = np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encs])
        lengths = np.array([len(e.ids) for e in encs])
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.owner = np.repeat(np.arange(len(encs)), lengths)
        self.vocab = layer.word.shape[0]
        self.rows = np.empty((len(self.ids), layer.word.shape[1]), dtype=np.float32)
        for s, e in tqdm(zip(encs, self.starts, strict=True), total=len(encs), desc="token rows"):
            ids = np.asarray(s.ids, dtype=np.int64)
            x = layer.word[ids].astype(np.float32) + layer.base[: len(ids)]
            x -= x.mean(axis=-1, keepdims=True)
            x /= np.sqrt((x * x).mean(axis=-1, keepdims=True) + layer.eps)
            self.rows[e : e + len(ids)] = x * layer.gamma + layer.beta

    def frequencies(self, prompts: np.ndarray) -> np.ndarray:
        counts = np.bincount(self.ids[np.isin(self.owner, prompts)], minlength=self.vocab)
        return counts / counts.sum()

    def pool(self, token_weight: np.ndarray) -> np.ndarray:
        w = token_weight[self.ids].astype(np.float32)
        sums = np.add.reduceat(self.rows * w[:, None], self.starts, axis=0)
        pooled = sums / np.maximum(np.add.reduceat(w, self.starts), 1e-12)[:, None]
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default="3e-5,5e-5,1e-4,2e-4,5e-4", help="values of a, comma-separated")
    args = p.parse_args()
    grid = [float(a) for a in args.weights.split(",")]
    folds = Folds()
    tokens = Tokens([question_text(r.prompt) for r in folds.recs])
    apgr = folds.fit_apgr

    rows: dict[str, dict[str, float]] = {}
    for u in tqdm(UNITS, desc="units left out"):
        train, test = folds.split(u)
        rows.setdefault("random", {})[u] = folds.random(test)
        freq = tokens.frequencies(train)
        rows.setdefault("mean (the shipped encoder)", {})[u] = apgr(tokens.pool(np.ones(tokens.vocab)), train, test)
        common = {}
        for a in grid:
            rows.setdefault(f"rare {a:g}", {})[u] = apgr(tokens.pool(a / (a + freq)), train, test)
            common[a] = tokens.pool(freq / (a + freq))
            rows.setdefault(f"common {a:g}", {})[u] = apgr(common[a], train, test)
        inner = {a: np.mean([apgr(common[a], *folds.split(v, train)) for v in UNITS if v != u]) for a in grid}
        best = max(grid, key=lambda a: inner[a])
        rows.setdefault("common nested (a chosen per fold)", {})[u] = apgr(common[best], train, test)
        tqdm.write(f"{u}: nested LOTO chose a={best:g}")
    print("\n" + variant_table(rows, "pooling"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
