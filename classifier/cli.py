"""Command line: ``python -m kvroute.classifier.cli <convert|train|calibrate|eval|refresh|export|bench|answer-train|
answer-eval|cascade-eval>``.

Data arguments take ``routellm`` / ``routellm:mmlu,gsm8k`` (the shipped RouteLLM files,
converted on the fly) or a JSONL path in the user format.  Splits are fixed
(:func:`classifier.data.assign_split`): training uses ``train``, calibration ``calib``,
evaluation ``heldout`` unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kvroute.classifier.data import ROUTELLM_STRONG, ROUTELLM_WEAK, SPLITS, load, select, write_jsonl
from kvroute.classifier.head import HEAD_KINDS

ALL_SPLITS = ("all", *SPLITS)


def _records(args: argparse.Namespace, splits: str, limit: int | None = None) -> list:
    wanted = SPLITS if splits == "all" else tuple(splits.split(","))
    recs = select(load(args.data), wanted, args.strong, args.weak)
    return _subsample(recs, limit) if limit else recs


def _subsample(recs: list, limit: int) -> list:
    """Every k-th record, so small runs keep each task's share (deterministic)."""
    step = max(1, len(recs) // limit)
    return recs[::step][:limit]


def _print(obj: dict) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def cmd_convert(args: argparse.Namespace) -> int:
    n = write_jsonl(load(args.data), args.out)
    print(f"wrote {n} records to {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from kvroute.classifier.calibrate import calibrate
    from kvroute.classifier.encoder import Encoder, EncoderConfig
    from kvroute.classifier.train import finetune, save, train_frozen

    recs = _records(args, args.splits, args.limit)
    if args.variant == "frozen":
        config = EncoderConfig(n_layers=args.n_layers, max_tokens=args.max_tokens,
                               quantize=args.quantize)
        scorer = train_frozen(recs, args.strong, args.weak, config, args.head, args.l2,
                              args.margin, Encoder(config, cache_dir=args.cache), args.data,
                              args.task_balance)
    else:
        scorer = finetune(recs, args.strong, args.weak, args.out, epochs=args.epochs,
                          max_tokens=args.max_tokens, lr=args.lr, margin=args.margin,
                          data_name=args.data)
    calib = _records(args, "calib", args.limit) or recs
    info = calibrate(scorer, [r.prompt for r in calib], args.strong_share)
    save(scorer, args.out)
    _print({"out": args.out, "version": scorer.version, "trained_on": len(recs),
            "calibration": info})
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from kvroute.classifier.artifact import new_version, resolve_artifact
    from kvroute.classifier.calibrate import calibrate
    from kvroute.classifier.model import load_scorer
    from kvroute.classifier.train import save

    scorer = load_scorer(args.model, cache_dir=args.cache)
    recs = _records(args, args.split, args.limit)
    info = calibrate(scorer, [r.prompt for r in recs], args.strong_share)
    # a new version, so that routers polling resolve_artifact pick up the new threshold
    scorer.version = new_version(prefix=scorer.version.split("+cal-")[0] + "+cal-")
    save(scorer, resolve_artifact(args.model)[0])
    info["version"] = scorer.version
    _print(info)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kvroute.classifier.evaluate import evaluate, write_report
    from kvroute.classifier.model import load_scorer

    scorer = load_scorer(args.model, cache_dir=args.cache)
    res = evaluate(scorer, _records(args, args.split, args.limit), args.strong, args.weak)
    res["data"], res["split"] = args.data, args.split
    write_report(res, args.out)
    print((Path(args.out) / "results.md").read_text())
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    from kvroute.classifier.refresh import refresh

    new = load(args.new)
    base = select(load(args.base), SPLITS, args.strong, args.weak) if args.base else []
    if args.limit:
        base = _subsample(base, args.limit)
    held = load(args.heldout) if args.heldout else None
    _print(refresh(args.root, new, args.strong, args.weak, base=base, heldout=held,
                   strong_share=args.strong_share, min_gain=args.min_gain,
                   cache_dir=args.cache))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kvroute.classifier.artifact import (
        export,
        new_version,
        read_metadata,
        resolve_artifact,
        swap_pointer,
    )
    from kvroute.classifier.evaluate import evaluate
    from kvroute.classifier.model import load_scorer

    meta = read_metadata(resolve_artifact(args.model)[0])
    extra: dict = {}
    if args.data:
        scorer = load_scorer(args.model, cache_dir=args.cache)
        res = evaluate(scorer, _records(args, "heldout", args.limit), args.strong, args.weak)
        extra["accepted_with"] = {
            "data": args.data, "split": "heldout", "random_apgr": res["random"]["apgr"],
            **{k: res[k] for k in ("apgr", "cpt50", "cpt80", "strong_share_for_95",
                                   "n_prompts")},
            "per_task_apgr": {t: r["apgr"] for t, r in res["per_task"].items()}}
    version = args.version or new_version()
    dest = Path(args.out) / version if args.pointer else Path(args.out)
    export(args.model, dest, {**extra, "version": version, "exported_from": meta["version"]})
    if args.pointer:
        swap_pointer(args.out, version)
    _print({"exported": str(dest), "version": version, **extra})
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from kvroute.classifier.bench import bench, write
    from kvroute.classifier.model import load_scorer

    res = bench(load_scorer(args.model), tokens=args.tokens, threads=args.threads,
                repeats=args.repeats, batch_size=args.batch_size)
    write(res, args.out)
    _print(res)
    return 0


def cmd_answer_train(args: argparse.Namespace) -> int:
    from kvroute.classifier.answer import encoder_config, load_gsm8k_answers, train_answer_scorer
    from kvroute.classifier.encoder import Encoder

    recs = [r for r in load_gsm8k_answers(args.weak) if r.split in args.splits.split(",")]
    recs = _subsample(recs, args.limit) if args.limit else recs
    encoder = Encoder(encoder_config(args.max_tokens), cache_dir=args.cache)
    scorer = train_answer_scorer(recs, args.l2, args.max_tokens, encoder)
    scorer.save(args.out)
    _print({"out": args.out, "version": scorer.version, "trained_on": len(recs)})
    return 0


def cmd_answer_eval(args: argparse.Namespace) -> int:
    from kvroute.classifier.answer import evaluate_answers, load_answer_scorer, load_gsm8k_answers

    recs = [r for r in load_gsm8k_answers(args.weak) if r.split == args.split]
    recs = _subsample(recs, args.limit) if args.limit else recs
    res = evaluate_answers(load_answer_scorer(args.model, cache_dir=args.cache), recs)
    res["split"] = args.split
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "answer.json").write_text(json.dumps(res, indent=2) + "\n")
    _print(res)
    return 0


def cmd_cascade_eval(args: argparse.Namespace) -> int:
    from kvroute.classifier.cascade_eval import run

    res = run(args.out, classifier_path=args.model, answer_path=args.answer_model, limit=args.limit,
              cache_dir=args.cache)
    print((Path(args.out) / "cascade.md").read_text())
    return 0 if res else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="classifier", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name: str, fn: object, help_: str, data: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.set_defaults(fn=fn)
        if data:
            sp.add_argument("--data", default="routellm", help="routellm[:tasks] or JSONL")
            sp.add_argument("--strong", default=ROUTELLM_STRONG)
            sp.add_argument("--weak", default=ROUTELLM_WEAK)
            sp.add_argument("--limit", type=int, help="use at most N records (smoke runs)")
        if name != "bench":
            sp.add_argument("--cache", default=os.environ.get("KVROUTE_CLASSIFIER_CACHE"),
                            help="embedding cache dir for offline runs "
                                 "(default $KVROUTE_CLASSIFIER_CACHE; off when unset)")
        return sp

    sp = add("convert", cmd_convert, "write data as JSONL (RouteLLM -> user format)")
    sp.add_argument("--out", required=True)
    sp = add("train", cmd_train, "train a model and calibrate it on the calib split")
    sp.add_argument("--out", required=True)
    sp.add_argument("--variant", choices=("frozen", "finetuned"), default="frozen")
    sp.add_argument("--head", choices=HEAD_KINDS, default="gain_knn")
    sp.add_argument("--task-balance", type=float, default=0.5,
                    help="0: rows weigh equally; 1: every task weighs the same in total")
    sp.add_argument("--l2", type=float, default=None, help="penalty (default per head)")
    sp.add_argument("--n-layers", type=int, default=0,
                    help="MiniLM transformer layers to run (0: embedding layer only; max 6)")
    sp.add_argument("--max-tokens", type=int, default=256)
    sp.add_argument("--quantize", action="store_true", help="int8 dynamic quantisation")
    sp.add_argument("--epochs", type=float, default=1.0, help="fine-tuning epochs")
    sp.add_argument("--lr", type=float, default=3e-5, help="fine-tuning learning rate")
    sp.add_argument("--margin", type=float, default=1.0, help="strong - weak >= margin")
    sp.add_argument("--splits", default="train", help="comma list of splits to train on")
    sp.add_argument("--strong-share", type=float, default=0.3)
    sp = add("calibrate", cmd_calibrate, "set a model's threshold for a target strong share")
    sp.add_argument("--model", required=True)
    sp.add_argument("--split", choices=ALL_SPLITS, default="calib")
    sp.add_argument("--strong-share", type=float, default=0.3)
    sp = add("eval", cmd_eval, "RouteLLM metrics on held-out data, with report files")
    sp.add_argument("--model", default=None, help="artifact or pointer dir (default: shipped)")
    sp.add_argument("--split", choices=ALL_SPLITS, default="heldout")
    sp.add_argument("--out", required=True)
    sp = add("refresh", cmd_refresh, "retrain on new logs; swap in only if APGR improves",
             data=False)
    sp.add_argument("--root", required=True, help="pointer dir holding versions + current")
    sp.add_argument("--new", required=True, help="new labelled logs (JSONL)")
    sp.add_argument("--base", default=None, help="older data to train on too, e.g. routellm")
    sp.add_argument("--heldout", default=None, help="held-out data (default: from --new/--base)")
    sp.add_argument("--strong", default=ROUTELLM_STRONG)
    sp.add_argument("--weak", default=ROUTELLM_WEAK)
    sp.add_argument("--limit", type=int, help="use at most N base records")
    sp.add_argument("--strong-share", type=float, default=0.3)
    sp.add_argument("--min-gain", type=float, default=0.0)
    sp = add("export", cmd_export, "copy a model to a versioned artifact dir with metrics")
    sp.add_argument("--model", required=True)
    sp.add_argument("--out", required=True, help="target dir (a pointer dir with --pointer)")
    sp.add_argument("--pointer", action="store_true", help="write OUT/<version>, swap OUT/current")
    sp.add_argument("--version", default=None)
    sp.set_defaults(data=None)
    sp = add("bench", cmd_bench, "latency p50/p99 and batched throughput", data=False)
    sp.add_argument("--model", default=None)
    sp.add_argument("--out", required=True)
    sp.add_argument("--tokens", type=int, default=256)
    sp.add_argument("--threads", type=int, default=1)
    sp.add_argument("--repeats", type=int, default=50)
    sp.add_argument("--batch-size", type=int, default=32)
    sp = add("answer-train", cmd_answer_train, "train the cascade's answer scorer (GSM8K weak answers)",
             data=False)
    sp.add_argument("--out", required=True)
    sp.add_argument("--weak", default=ROUTELLM_WEAK, help="whose answers to learn from")
    sp.add_argument("--splits", default="train", help="comma list of splits to train on")
    sp.add_argument("--l2", type=float, default=1.0)
    sp.add_argument("--max-tokens", type=int, default=384)
    sp.add_argument("--limit", type=int, help="use at most N records (smoke runs)")
    sp = add("answer-eval", cmd_answer_eval, "AUROC/Brier of the answer scorer on held-out GSM8K", data=False)
    sp.add_argument("--model", default=None, help="answer artifact (default: shipped answer-default)")
    sp.add_argument("--weak", default=ROUTELLM_WEAK)
    sp.add_argument("--split", choices=SPLITS, default="heldout")
    sp.add_argument("--out", default=None)
    sp.add_argument("--limit", type=int)
    sp = add("cascade-eval", cmd_cascade_eval, "quality vs strong cost: classifier, cascade, both (GSM8K)",
             data=False)
    sp.add_argument("--model", default=None, help="tier classifier artifact (default: shipped)")
    sp.add_argument("--answer-model", default=None, help="answer scorer artifact (default: shipped)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--limit", type=int)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    raise SystemExit(main())
