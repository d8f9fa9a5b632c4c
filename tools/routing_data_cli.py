"""The command line the routing-data converters share (tools/*_routing.py): which repository,
which two models, under which names their scores are stored, and an optional sample."""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

Rows = Callable[[Path, str, str, str, str], list[dict]]  # (repo, strong, weak, strong_key, weak_key)


def run(doc: str, repo_help: str, strong: str, weak: str, rows: Rows) -> int:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--repo", required=True, type=Path, help=repo_help)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--strong", default=strong)
    p.add_argument("--weak", default=weak)
    p.add_argument("--strong-key", help="name to store the strong model's scores under (default: --strong)")
    p.add_argument("--weak-key", help="name to store the weak model's scores under (default: --weak)")
    p.add_argument("--limit", type=int, default=0, help="a seeded sample of this many rows (0: all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = rows(args.repo, args.strong, args.weak, args.strong_key or args.strong, args.weak_key or args.weak)
    if args.limit:
        out = random.Random(args.seed).sample(out, min(args.limit, len(out)))
    with args.out.open("w") as fh:
        for row in out:
            fh.write(json.dumps(row) + "\n")
    print(f"{len(out)} rows -> {args.out}")
    return 0
