"""Refresh: retrain on new labelled logs, recalibrate, and swap in only a better model.

The candidate and the live model are both scored on the same held-out records; the
candidate goes live only if its APGR beats the live one's by ``min_gain``.  Going live
means writing the complete artifact under a new version name inside the pointer
directory and then replacing the ``current`` pointer atomically (see
:mod:`classifier.artifact`).  A router polling ``resolve_artifact(root)`` sees the new
version on its next poll and reloads; nothing restarts, and a rejected candidate never
touches ``current``.
"""

from __future__ import annotations

from pathlib import Path

from kvroute.classifier.artifact import resolve_artifact, swap_pointer
from kvroute.classifier.calibrate import calibrate
from kvroute.classifier.data import Record, select
from kvroute.classifier.encoder import Encoder, EncoderConfig
from kvroute.classifier.evaluate import evaluate
from kvroute.classifier.model import FinetunedScorer, FrozenScorer, load_scorer
from kvroute.classifier.train import save, train_frozen


def current_scorer(root: Path, cache_dir: str | None = None
                   ) -> FrozenScorer | FinetunedScorer | None:
    try:
        resolve_artifact(root)
    except FileNotFoundError:
        return None
    return load_scorer(root, cache_dir=cache_dir)


def consider(root: str | Path, candidate: FrozenScorer, heldout: list[Record], strong: str,
             weak: str, min_gain: float = 0.0, cache_dir: str | None = None) -> dict:
    """Evaluate candidate vs live model on ``heldout``; promote the candidate if better.

    Candidates are frozen-encoder models (their artifact is the small head); the live
    model may be of either variant.
    """
    if not isinstance(candidate, FrozenScorer):
        raise TypeError("refresh promotes frozen-encoder candidates only")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    live = current_scorer(root, cache_dir)
    cand = evaluate(candidate, heldout, strong, weak)
    old = evaluate(live, heldout, strong, weak) if live is not None else None
    accepted = old is None or cand["apgr"] > old["apgr"] + min_gain
    decision = {"accepted": accepted, "candidate_version": candidate.version,
                "candidate_apgr": cand["apgr"], "min_gain": min_gain,
                "live_version": live.version if live else None,
                "live_apgr": old["apgr"] if old else None}
    if accepted:
        candidate.metadata["accepted_with"] = {
            "heldout": {k: cand[k] for k in ("apgr", "cpt50", "cpt80", "strong_share_for_95",
                                             "n_prompts")},
            "random_apgr": cand["random"]["apgr"], "replaced": decision["live_version"],
            "replaced_apgr": decision["live_apgr"]}
        save(candidate, root / candidate.version)  # complete before the pointer moves
        swap_pointer(root, candidate.version)
    decision["current"] = resolve_artifact(root)[1]
    return decision


def refresh(root: str | Path, new: list[Record], strong: str, weak: str,
            base: list[Record] | None = None, heldout: list[Record] | None = None,
            strong_share: float = 0.3, min_gain: float = 0.0, head_kind: str = "gain_within",
            config: EncoderConfig | None = None, cache_dir: str | None = None) -> dict:
    """Train a frozen-encoder candidate on ``base + new`` training splits and consider it.

    Held-out records default to the held-out split of ``base + new``; they are never
    trained on.  The encoder config follows the live model's, so scores stay comparable.
    """
    pool = (base or []) + new
    train = select(pool, ["train"], strong, weak)
    calib = select(pool, ["calib"], strong, weak) or train
    held = select(heldout if heldout is not None else pool, ["heldout"], strong, weak)
    if not train or not held:
        raise ValueError(f"refresh needs training and held-out rows; got {len(train)} train, "
                         f"{len(held)} held-out")
    live = current_scorer(Path(root), cache_dir)
    if config is None and isinstance(live, FrozenScorer):
        config = live.encoder.config
    config = config or EncoderConfig(surface_features=False)  # as the shipped default
    candidate = train_frozen(train, strong, weak, config, head_kind=head_kind,
                             encoder=Encoder(config, cache_dir=cache_dir), data_name="refresh")
    calibrate(candidate, [r.prompt for r in calib], strong_share)
    return consider(root, candidate, held, strong, weak, min_gain, cache_dir)
