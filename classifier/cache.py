"""Optional on-disk cache of sentence embeddings, for repeated offline runs.

Training, evaluation and refresh embed the same prompts again and again; on a CPU that
is most of their cost.  Embeddings are stored per encoder setting in one ``.npz`` file,
keyed by a hash of the prompt.  The router's scoring path never uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


class EmbeddingCache:
    """Prompt-hash -> embedding rows for one encoder setting (``tag``)."""

    def __init__(self, directory: str | Path, tag: dict) -> None:
        digest = hashlib.sha1(json.dumps(tag, sort_keys=True).encode()).hexdigest()[:12]
        self.path = Path(directory) / f"embeddings-{digest}.npz"
        self.rows: dict[str, np.ndarray] = {}
        if self.path.exists():
            with np.load(self.path) as z:
                self.rows = dict(zip(z["keys"].tolist(), z["vecs"], strict=True))

    def get(self, prompts: Sequence[str]) -> tuple[dict[int, np.ndarray], list[int]]:
        """(found rows by index, indices still to compute)."""
        found, missing = {}, []
        for i, p in enumerate(prompts):
            vec = self.rows.get(_key(p))
            if vec is None:
                missing.append(i)
            else:
                found[i] = vec
        return found, missing

    def put(self, prompts: Sequence[str], vecs: np.ndarray) -> None:
        for p, v in zip(prompts, vecs, strict=True):
            self.rows[_key(p)] = v
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        with tmp.open("wb") as fh:
            np.savez(fh, keys=np.array(list(self.rows)), vecs=np.stack(list(self.rows.values())))
        os.replace(tmp, self.path)
