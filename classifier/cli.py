"""Command line: ``python -m kvroute.classifier.cli <convert|train|calibrate|eval|loto|refresh|export|bench|
answer-train|answer-eval|cascade-eval>``.

Data arguments take ``routellm`` / ``routellm:mmlu,gsm8k`` (the shipped RouteLLM files,
converted on the fly) or a JSONL path in the user format.  Splits are fixed
(:func:`classifier.data.assign_split`): training uses ``train``, calibration ``calib``,
evaluation ``heldout`` on RouteLLM data and every row of a user's JSONL, unless told otherwise.
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
                               quantize=args.quantize, surface_features=args.surface_features)
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


def eval_split(args: argparse.Namespace) -> str:
    """``--split`` if given; else ``heldout`` for RouteLLM data (training saw the rest) and
    ``all`` for a user's JSONL (the shipped model never trained on it)."""
    if args.split:
        return str(args.split)
    return "heldout" if args.data.startswith("routellm") else "all"


def cmd_eval(args: argparse.Namespace) -> int:
    from kvroute.classifier.evaluate import compare, evaluate, write_report
    from kvroute.classifier.model import load_scorer

    scorer = load_scorer(args.model, cache_dir=args.cache)
    split = eval_split(args)
    recs = _records(args, split, args.limit)
    res = evaluate(scorer, recs, args.strong, args.weak)
    res["data"], res["split"] = args.data, split
    if args.compare:
        res["compare"] = compare(scorer, load_scorer(args.compare, cache_dir=args.cache), recs,
                                 args.strong, args.weak)
    write_report(res, args.out)
    print((Path(args.out) / "results.md").read_text())
    return 0


def cmd_loto(args: argparse.Namespace) -> int:
    from kvroute.classifier.loto import RECIPES, UNITS, layer_features, loto, unit_of, write

    try:
        layers = [int(n) for n in args.layers.split(",")]
    except ValueError:
        layers = [-1]
    if any(not 0 <= n <= 6 for n in layers) or len(set(layers)) < len(layers):
        raise SystemExit(f"classifier loto: --layers must be distinct MiniLM layers 0-6, "
                         f"comma-separated; got {args.layers!r}")
    unknown = [n for n in args.recipes.split(",") if n not in RECIPES]
    if unknown:
        raise SystemExit(f"classifier loto: unknown recipe {unknown[0]!r}; choose from {', '.join(RECIPES)}")
    recs = [r for r in load(args.data) if args.strong in r.scores and args.weak in r.scores]
    if args.limit:
        recs = _subsample(recs, args.limit)
    present = {unit_of(r) for r in recs}
    if args.units:
        units = args.units.split(",")
        missing = [u for u in units if u not in present]
        if missing:
            raise SystemExit(f"classifier loto: --units: no record of unit {missing[0]!r} in the data; "
                             f"it has {', '.join(sorted(present))}")
    else:
        units = [u for u in UNITS if u in present]
    x = layer_features([r.prompt for r in recs], layers, args.cache)
    res = loto(recs, x, [RECIPES[n] for n in args.recipes.split(",")], args.strong, args.weak,
               units, layers)
    write(res, args.out)
    print((Path(args.out) / "loto.md").read_text())
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    from kvroute.classifier.refresh import refresh

    if (args.new is None) == (args.from_logs is None):
        raise SystemExit("classifier refresh: give exactly one of --new FILE or --from-logs DIR")
    if args.feedback and not args.from_logs:
        raise SystemExit("classifier refresh: --feedback goes with --from-logs")
    stats = None
    if args.from_logs:
        from kvroute.classifier.logs import read_prompt_logs

        labelled = read_prompt_logs(args.from_logs, args.strong, args.weak, args.cheap_tier,
                                    args.feedback)
        new, stats = labelled.records, labelled.summary()
    else:
        new = load(args.new)
    base = select(load(args.base), SPLITS, args.strong, args.weak) if args.base else []
    if args.limit:
        base = _subsample(base, args.limit)
    # from logs: judge the candidate on a held-out slice of the same logs
    held = load(args.heldout) if args.heldout else (new if args.from_logs else None)
    decision = refresh(args.root, new, args.strong, args.weak, base=base, heldout=held,
                       strong_share=args.strong_share, min_gain=args.min_gain, cache_dir=args.cache)
    _print({**decision, **({"from_logs": stats} if stats else {})})
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
    sp.add_argument("--head", choices=HEAD_KINDS, default="gain_within")
    sp.add_argument("--task-balance", type=float, default=0.25,
                    help="0: rows weigh equally; 1: every task weighs the same in total")
    sp.add_argument("--l2", type=float, default=None, help="penalty (default per head)")
    sp.add_argument("--n-layers", type=int, default=0,
                    help="MiniLM transformer layers to run (0: embedding layer only; max 6)")
    sp.add_argument("--max-tokens", type=int, default=256)
    sp.add_argument("--quantize", action="store_true", help="int8 dynamic quantisation")
    sp.add_argument("--surface-features", action=argparse.BooleanOptionalAction, default=False,
                    help="add six length/digit surface features to the embedding")
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
    sp.add_argument("--split", choices=ALL_SPLITS, default=None,
                    help="default: heldout for routellm data, all for a JSONL file")
    sp.add_argument("--compare", default=None, metavar="CANDIDATE",
                    help="also score a candidate model: its metrics and its agreement with --model")
    sp.add_argument("--out", required=True)
    sp = add("loto", cmd_loto, "leave-one-task-out validation of training recipes")
    sp.add_argument("--recipes", default="old-default,logreg,default",
                    help="comma list of recipes (classifier/loto.py RECIPES)")
    sp.add_argument("--layers", default="0",
                    help="MiniLM layers whose pooled outputs are the features, side by side "
                         "(0: the embedding layer, as shipped; deeper layers need torch)")
    sp.add_argument("--units", default=None,
                    help="comma list of units to leave out in turn (default: the six RouteLLM units); "
                         "a unit is mmlu:<group> or a task name, and rows of other units always train")
    sp.add_argument("--out", required=True)
    sp = add("refresh", cmd_refresh, "retrain on new logs; swap in only if APGR improves",
             data=False)
    sp.add_argument("--root", required=True, help="pointer dir holding versions + current")
    sp.add_argument("--new", default=None, help="new labelled data (JSONL with prompt and scores)")
    sp.add_argument("--from-logs", default=None, metavar="DIR",
                    help="the router's prompt logs (*.jsonl, rotated *.jsonl.N): labels from cascades")
    sp.add_argument("--feedback", default=None, metavar="FILE",
                    help="with --from-logs: judge/user verdicts, JSONL {trace_id|prompt, label}")
    sp.add_argument("--cheap-tier", default=None,
                    help="with --from-logs: the cheapest tier's name (default: from cascade rows)")
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
