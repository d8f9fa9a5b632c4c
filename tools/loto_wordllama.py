"""Leave-one-task-out APGR of WordLlama's static embeddings beside or instead of the embedding layer.

    pip install wordllama && python tools/loto_wordllama.py

WordLlama (MIT) ships token embeddings taken from a large LLM's embedding table and trained
for sentence similarity (``l2_supercat_256``: 32,000 tokens of 256 dimensions, 16 MB), read
like the shipped encoder: the mean of a prompt's token vectors. The files are read from
the installed package, which is never imported (its loader would reach for a model hub).
Same units, data, scoring and ``gain_within`` fit as ``kvroute classifier loto``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from tqdm import tqdm

from kvroute.classifier.data import question_text
from kvroute.classifier.loto import UNITS, Folds, layer_features, variant_table


def wordllama_features(texts: list[str]) -> np.ndarray:
    spec = importlib.util.find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the wordllama package: pip install wordllama")
    root = Path(next(iter(spec.submodule_search_locations)))
    table = next(iter(load_file(str(root / "weights" / "l2_supercat_256.safetensors")).values())).astype(np.float32)
    tokenizer = Tokenizer.from_file(str(root / "tokenizers" / "l2_supercat_tokenizer_config.json"))
    out = np.zeros((len(texts), table.shape[1]))
    for i, enc in enumerate(tokenizer.encode_batch(texts, add_special_tokens=False)):
        if enc.ids:
            out[i] = table[np.clip(enc.ids, 0, len(table) - 1)].mean(0)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def main() -> int:
    folds = Folds()
    static = wordllama_features([question_text(r.prompt) for r in folds.recs])
    emb = layer_features(list(folds.prompts), [0])[:, :384]  # the shipped features, no surface ones
    rows: dict[str, dict[str, float]] = {}
    for u in tqdm(UNITS, desc="units left out"):
        train, test = folds.split(u)
        rows.setdefault("random", {})[u] = folds.random(test)
        rows.setdefault("embedding layer (shipped)", {})[u] = folds.fit_apgr(emb, train, test)
        rows.setdefault("WordLlama 256", {})[u] = folds.fit_apgr(static, train, test)
        both = np.hstack([emb, static])
        rows.setdefault("embedding layer + WordLlama 256", {})[u] = folds.fit_apgr(both, train, test)
    print("\n" + variant_table(rows, "features"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
