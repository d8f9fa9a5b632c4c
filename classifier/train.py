"""Training: frozen encoder + head (default), or the fine-tuned encoder.

Both read :class:`~classifier.data.Record` lists already restricted to training splits
by the caller, label them with :func:`classifier.data.label`, and write an artifact dir
(see :mod:`classifier.artifact`) whose threshold is then set by :mod:`classifier.calibrate`.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kvroute.classifier.artifact import new_version, write_metadata
from kvroute.classifier.data import Record, label
from kvroute.classifier.encoder import ENCODER_NAME, Encoder, EncoderConfig, encoder_path
from kvroute.classifier.head import DEFAULT_L2, fit_head
from kvroute.classifier.model import FinetunedScorer, FrozenScorer


def embed(encoder: Encoder, prompts: list[str], desc: str = "embedding") -> np.ndarray:
    """Features for ``prompts`` with a progress bar."""
    with tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False) as bar:
        return encoder.embed(prompts, progress=bar.update)


def gains(records: list[Record], strong: str, weak: str, margin: float) -> np.ndarray:
    """Strong - weak in units of ``margin`` (the head clips it to [-1, 1])."""
    return np.array([(r.scores[strong] - r.scores[weak]) / margin for r in records])


def labels(records: list[Record], strong: str, weak: str, margin: float) -> np.ndarray:
    y = np.array([label(r, strong, weak, margin) for r in records], dtype=np.float32)
    if len(set(y.tolist())) < 2:
        raise ValueError(f"training data needs both labels; got {len(y)} rows all {y[:1]}")
    return y


def task_weights(records: list[Record], power: float = 0.25) -> np.ndarray:
    """Row weights that move each task's total weight toward an equal share.

    ``power`` 0 keeps rows equal (big tasks dominate), 1 gives every task the same total.
    RouteLLM's data is 13 MMLU rows to 1 GSM8K row. 0.25 was best in leave-one-task-out
    validation for the default ``gain_within`` head; 0.5 was best for the former
    ``gain_knn`` default in 5-fold cross-validation on the training split.
    """
    counts = Counter(r.task for r in records)
    per_task = {t: (len(records) / (len(counts) * n)) ** power for t, n in counts.items()}
    w = np.array([per_task[r.task] for r in records])
    return w * len(w) / w.sum()


def _describe(records: list[Record], strong: str, weak: str, margin: float) -> dict:
    return {"n_prompts": len(records), "tasks": dict(Counter(r.task for r in records)),
            "strong": strong, "weak": weak, "margin": margin,
            "positive_rate": float(labels(records, strong, weak, margin).mean())}


def base_metadata(variant: str, data: dict, **extra: object) -> dict:
    return {"version": new_version(), "variant": variant, "encoder": ENCODER_NAME,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "training_data": data, "threshold": 0.5, **extra}


def train_frozen(records: list[Record], strong: str, weak: str, config: EncoderConfig,
                 head_kind: str = "gain_within", l2: float | None = None, margin: float = 1.0,
                 encoder: Encoder | None = None, data_name: str = "",
                 task_balance: float = 0.25) -> FrozenScorer:
    """Embed the training prompts once, fit the head, return an unsaved scorer."""
    encoder = encoder or Encoder(config)
    y = labels(records, strong, weak, margin)
    x = embed(encoder, [r.prompt for r in records], "embedding train set")
    head = fit_head(x, y, kind=head_kind, l2=l2, gain=gains(records, strong, weak, margin),
                    weight=task_weights(records, task_balance),
                    groups=np.array([r.task for r in records]))
    data = {"source": data_name, **_describe(records, strong, weak, margin)}
    meta = base_metadata("frozen", data, encoder_config=config.to_dict(),
                         head={"kind": head_kind, "task_balance": task_balance,
                               "l2": DEFAULT_L2[head_kind] if l2 is None else l2})
    return FrozenScorer(encoder, head, 0.5, meta["version"], meta)


def save_frozen(scorer: FrozenScorer, directory: str | Path) -> Path:
    """Write ``head.npz`` + ``metadata.json`` (threshold and version included)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scorer.head.save(directory / "head.npz")
    write_metadata(directory, {**scorer.metadata, "threshold": scorer.threshold,
                               "version": scorer.version})
    return directory


def finetune(records: list[Record], strong: str, weak: str, out: str | Path,
             epochs: float = 1.0, max_tokens: int = 128, lr: float = 3e-5,
             batch_size: int = 16, margin: float = 1.0, seed: int = 0,
             data_name: str = "") -> FinetunedScorer:
    """Fine-tune MiniLM end to end (BCE on one logit, class-balanced) and save to ``out``."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kvroute.classifier.data import question_text

    torch.manual_seed(seed)
    y = labels(records, strong, weak, margin)
    texts = [question_text(r.prompt) for r in records]
    tok = AutoTokenizer.from_pretrained(encoder_path())
    model = AutoModelForSequenceClassification.from_pretrained(encoder_path(), num_labels=1)
    pos = float(y.mean())
    pos_weight = torch.tensor((1 - pos) / max(pos, 1e-3))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = max(1, math.ceil(len(texts) * epochs / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.1 * steps))
                                              * max(0.0, 1 - s / steps))
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    for _ in tqdm(range(steps), desc="fine-tuning", unit="step"):
        if len(order) < batch_size:
            order += rng.sample(range(len(texts)), len(texts))
        idx, order = order[:batch_size], order[batch_size:]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True,
                  max_length=max_tokens, return_tensors="pt")
        logits = model(**enc).logits[:, 0]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, torch.from_numpy(y[idx]), pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    out = Path(out)
    (out / "model").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    meta = base_metadata("finetuned", {"source": data_name,
                                       **_describe(records, strong, weak, margin)},
                         max_tokens=max_tokens, question_only=True,
                         finetune={"epochs": epochs, "lr": lr, "batch_size": batch_size})
    write_metadata(out, meta)
    return FinetunedScorer(out / "model", 0.5, meta["version"], meta)


def save(scorer: FrozenScorer | FinetunedScorer, directory: str | Path) -> Path:
    """Persist a scorer's threshold/metadata (and head, for the frozen variant)."""
    if isinstance(scorer, FrozenScorer):
        return save_frozen(scorer, directory)
    write_metadata(directory, {**scorer.metadata, "threshold": scorer.threshold,
                               "version": scorer.version})
    return Path(directory)

