"""The numpy embedding layer that serves the shipped models matches MiniLM's torch layer."""

from __future__ import annotations

import sys

import numpy as np

from kvroute.classifier.encoder import EmbeddingLayer, Encoder, EncoderConfig, TorchEncoder, encoder_path

TEXTS = ["What is 17 * 23?", "word " * 600 + "tail?", "Ünïcödé TEXT,   spaces\n\nand 123.45", ""]


def test_numpy_embedding_layer_matches_the_torch_encoder():
    cfg = EncoderConfig(n_layers=0, max_tokens=64)
    ours, reference = Encoder(cfg), TorchEncoder(cfg, encoder_path())
    assert isinstance(ours._backend, EmbeddingLayer)
    a, b = ours._embed_batch(TEXTS), reference(TEXTS)
    assert a.shape == b.shape == (len(TEXTS), 384)
    assert np.abs(a - b).max() < 2e-4  # float16 word embeddings
    assert [ours.token_count(t) for t in TEXTS] == [reference.token_count(t) for t in TEXTS]


def test_scoring_the_shipped_model_imports_no_torch():
    import subprocess

    code = ("import sys; from kvroute.classifier.model import load_scorer; "
            "s = load_scorer(None); assert 0 <= s.score(['What is 2 + 2?'])[0] <= 1; "
            "from kvroute.classifier.answer import load_answer_scorer; load_answer_scorer(None); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
