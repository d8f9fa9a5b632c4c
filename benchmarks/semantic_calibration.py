"""Calibrate the semantic cache's threshold on distinct questions and their paraphrases.

    python -m kvroute.benchmarks.semantic_calibration --out docs/assets/semantic [--ann]

Each split (RouteLLM's fixed split of MMLU and GSM8K: ``calibration`` and ``heldout``) is
a cache experiment. Half of its questions are stored; then two kinds of query arrive:

- **paraphrases** of stored questions (benchmarks/semantic_data.py's rules): a *true hit*
  when the lookup returns the question it rewords;
- **unseen questions** (the other half: distinct questions with their own answers), and
  paraphrases that come back with another question's entry: a *false hit*.

The lookup is the cache's own: nearest stored entries (top 4) at or above the threshold,
the first that passes the near-opposite check. Curves of hit rate against false-hit rate
over thresholds, with and without the check, go to ``semantic.json``, ``semantic.md``
and ``semantic.png``; the default threshold is the lowest whose false-hit rate on the
calibration split is at most ``--target`` / 2 (a margin), and its rates on the held-out
split are reported. The near-opposite pairs (``benchmarks/data/semantic/near_opposites.jsonl``)
are scored at every threshold. ``--ann`` adds the index measurements (flat numpy,
hnswlib, usearch, faiss) that chose the index.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

from kvroute.benchmarks import semantic_data
from kvroute.router.cache.config import DEFAULT_THRESHOLD
from kvroute.router.cache.semantic import CANDIDATES, Embedder
from kvroute.router.cache.semantic_check import conflict

PAIRS = Path(__file__).resolve().parent / "data" / "semantic" / "near_opposites.jsonl"
THRESHOLDS = [round(0.80 + 0.005 * i, 3) for i in range(41)]


def embed(embedder: Embedder, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors, and which texts fit the encoder (longer ones the cache bypasses)."""
    out = np.zeros((len(texts), 384), dtype=np.float32)
    ok = np.zeros(len(texts), dtype=bool)
    for i, text in enumerate(texts):
        v = embedder(text)
        if v is not None:
            out[i], ok[i] = v, True
    return out, ok


def lookup_rows(stored_vecs: np.ndarray, stored_texts: list[str], queries: np.ndarray,
                query_texts: list[str]) -> list[list[tuple[float, int, bool]]]:
    """Per query: its top candidates (similarity, stored index, passes the check)."""
    out = []
    scores = queries @ stored_vecs.T
    for q in range(len(queries)):
        top = np.argsort(-scores[q])[:CANDIDATES]
        out.append([(float(scores[q, j]), int(j), conflict(query_texts[q], stored_texts[j]) is None) for j in top])
    return out


def served(candidates: list[tuple[float, int, bool]], threshold: float, check: bool) -> int | None:
    """The stored index a lookup answers with, as SemanticCache.lookup decides."""
    for score, j, passes in candidates:
        if score < threshold:
            return None
        if passes or not check:
            return j
    return None


def split_experiment(embedder: Embedder, qs: list[semantic_data.Question], seed: int) -> dict:
    rng = random.Random(seed)
    qs = sorted(qs, key=lambda q: q.text)
    rng.shuffle(qs)
    half = len(qs) // 2
    stored_q, unseen_q = qs[:half], qs[half:]
    paraphrased = [(i, *semantic_data.paraphrase(q.text, rng)) for i, q in enumerate(stored_q)]
    stored_vecs, stored_ok = embed(embedder, [q.text for q in stored_q])
    keep = [i for i in range(len(stored_q)) if stored_ok[i]]
    stored_vecs, stored_texts = stored_vecs[keep], [stored_q[i].text for i in keep]
    position = {orig: k for k, orig in enumerate(keep)}
    para = [(position[i], text, rules) for i, text, rules in paraphrased if i in position]
    para_vecs, para_ok = embed(embedder, [t for _, t, _ in para])
    para = [p for p, ok in zip(para, para_ok, strict=True) if ok]
    para_vecs = para_vecs[para_ok]
    unseen_vecs, unseen_ok = embed(embedder, [q.text for q in unseen_q])
    unseen_texts = [q.text for q, ok in zip(unseen_q, unseen_ok, strict=True) if ok]
    unseen_vecs = unseen_vecs[unseen_ok]
    para_rows = lookup_rows(stored_vecs, stored_texts, para_vecs, [t for _, t, _ in para])
    unseen_rows = lookup_rows(stored_vecs, stored_texts, unseen_vecs, unseen_texts)
    curve = []
    for t in THRESHOLDS:
        point: dict = {"threshold": t}
        for check in (True, False):
            suffix = "" if check else "_no_check"
            true_hits = wrong = 0
            for (source, _, _), rows in zip(para, para_rows, strict=True):
                got = served(rows, t, check)
                true_hits += got == source
                wrong += got is not None and got != source
            false_unseen = sum(served(rows, t, check) is not None for rows in unseen_rows)
            point["hit_rate" + suffix] = round(true_hits / max(len(para), 1), 4)
            point["false_hit_rate" + suffix] = round((false_unseen + wrong) / max(len(unseen_rows) + len(para), 1), 5)
            point["false_hits" + suffix] = false_unseen + wrong
        curve.append(point)
    # The check's cost on true paraphrases: vetoes of a paraphrase against its own question.
    rejected: dict[str, list[int]] = {}
    for (source, text, rules) in para:
        vetoed = conflict(text, stored_texts[source]) is not None
        for rule in rules:
            rejected.setdefault(rule, [0, 0])[0] += vetoed
            rejected[rule][1] += 1
    vetoed_all = sum(conflict(text, stored_texts[s]) is not None for s, text, _ in para)
    return {"stored": len(stored_texts), "paraphrase_queries": len(para), "unseen_queries": len(unseen_rows),
            "curve": curve, "check_rejects_paraphrases": round(vetoed_all / max(len(para), 1), 4),
            "check_rejects_by_rule": {k: round(v[0] / v[1], 4) for k, v in sorted(rejected.items())}}


def near_opposites(embedder: Embedder, threshold: float) -> dict:
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    a, _ = embed(embedder, [p["a"] for p in pairs])
    b, _ = embed(embedder, [p["b"] for p in pairs])
    sims = np.sum(a * b, axis=1)
    by_kind: dict[str, dict] = {}
    hits = []
    for p, s in zip(pairs, sims, strict=True):
        k = by_kind.setdefault(p["kind"], {"pairs": 0, "above_threshold": 0, "hits": 0})
        k["pairs"] += 1
        above = s >= threshold
        k["above_threshold"] += int(above)
        if above and conflict(p["a"], p["b"]) is None:
            k["hits"] += 1
            hits.append({**p, "similarity": round(float(s), 4)})
    return {"pairs": len(pairs), "threshold": threshold, "median_similarity": round(float(np.median(sims)), 4),
            "above_threshold": int(np.sum(sims >= threshold)), "hits": len(hits), "by_kind": by_kind,
            "hit_pairs": hits}


def ann_bench(sizes: tuple[int, ...] = (1000, 4000, 16000), queries: int = 200) -> dict:
    """Per-query latency (one thread) and recall@1 of each index at each size."""
    rng = np.random.default_rng(0)
    return {n: _ann_at(n, queries, rng) for n in sizes}


def _ann_at(n: int, queries: int, rng: np.random.Generator) -> dict:
    x = rng.standard_normal((n, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:queries] + 0.05 * rng.standard_normal((queries, 384)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = np.argmax(q @ x.T, axis=1)
    row: dict = {}

    def timed(name: str, search, build=None) -> None:
        if build is not None:
            start = time.perf_counter()
            build()
            row[name + "_build_s"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        got = [search(v) for v in q]
        row[name + "_query_us"] = round((time.perf_counter() - start) / queries * 1e6, 1)
        row[name + "_recall"] = round(float(np.mean(np.array(got) == exact)), 4)

    timed("flat_numpy", lambda v: int(np.argmax(x @ v)))
    import hnswlib

    h = hnswlib.Index(space="ip", dim=384)

    def build_hnsw() -> None:
        h.init_index(max_elements=n, M=16, ef_construction=100)
        h.set_num_threads(1)
        h.add_items(x)
        h.set_ef(64)

    timed("hnswlib", lambda v: int(h.knn_query(v, k=1)[0][0, 0]), build_hnsw)
    try:  # the alternatives measured against hnswlib (not kvroute dependencies)
        import faiss
        from usearch.index import Index
    except ImportError:
        return row
    faiss.omp_set_num_threads(1)
    u = Index(ndim=384, metric="ip", dtype="f32")
    timed("usearch", lambda v: int(u.search(v, 1, threads=1).keys[0]), lambda: u.add(np.arange(n), x, threads=1))
    f = faiss.IndexHNSWFlat(384, 16, faiss.METRIC_INNER_PRODUCT)
    timed("faiss_hnsw", lambda v: int(f.search(v[None], 1)[1][0, 0]), lambda: f.add(x))
    return row


def choose(curve: list[dict], target: float) -> float:
    for point in curve:
        if point["false_hit_rate"] <= target / 2:
            return point["threshold"]
    return 1.0


def table(results: dict) -> str:
    lines = ["| threshold | split | hit rate | false-hit rate | false hits | hit rate, no check | "
             "false-hit rate, no check |", "|---|---|---|---|---|---|---|"]
    for t in THRESHOLDS[::4] + ([results["threshold"]] if results["threshold"] not in THRESHOLDS[::4] else []):
        for split in ("calibration", "heldout"):
            p = next(p for p in results[split]["curve"] if p["threshold"] == t)
            lines.append(f"| {t} | {split} | {p['hit_rate']} | {p['false_hit_rate']} | {p['false_hits']} | "
                         f"{p['hit_rate_no_check']} | {p['false_hit_rate_no_check']} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for split, style in (("calibration", "--"), ("heldout", "-")):
        curve = results[split]["curve"]
        for suffix, label in (("", "with check"), ("_no_check", "cosine only")):
            ax.plot([p["false_hit_rate" + suffix] * 100 for p in curve], [p["hit_rate" + suffix] for p in curve],
                    style, marker="." if suffix else None, label=f"{split}, {label}")
    t = results["threshold"]
    p = next(p for p in results["heldout"]["curve"] if p["threshold"] == t)
    ax.scatter([p["false_hit_rate"] * 100], [p["hit_rate"]], color="black", zorder=5,
               label=f"default threshold {t} (held-out)")
    ax.axvline(0.1, color="grey", lw=0.8, ls=":")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("false-hit rate (%)")
    ax.set_ylabel("paraphrase hit rate")
    ax.set_title("Semantic cache: MMLU + GSM8K, rule-based paraphrases")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/assets/semantic"))
    p.add_argument("--target", type=float, default=0.001, help="the false-hit rate the threshold must stay under")
    p.add_argument("--limit", type=int, default=0, help="questions per split (0: all), for a quick run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ann", action="store_true", help="also measure the ANN indexes")
    p.add_argument("--write-pairs", action="store_true", help="regenerate the near-opposite pair file")
    args = p.parse_args(argv)
    embedder = Embedder()
    qs = semantic_data.questions()
    if args.write_pairs:
        gsm8k = [q.text for q in qs if q.task == "gsm8k" and q.split == "calibration"]
        pairs = semantic_data.near_opposite_pairs(gsm8k, args.seed)
        PAIRS.write_text("".join(json.dumps(x) + "\n" for x in pairs))
    argv = sys.argv[1:] if argv is None else argv
    results: dict = {"command": "python -m kvroute.benchmarks.semantic_calibration " + " ".join(argv),
                     "shipped_default": DEFAULT_THRESHOLD}
    for split in ("calibration", "heldout"):
        part = [q for q in qs if q.split == split]
        if args.limit:
            part = random.Random(args.seed).sample(part, min(args.limit, len(part)))
        results[split] = split_experiment(embedder, part, args.seed)
    results["threshold"] = choose(results["calibration"]["curve"], args.target)
    at = {s: next(p for p in results[s]["curve"] if p["threshold"] == results["threshold"])
          for s in ("calibration", "heldout")}
    results["at_threshold"] = at
    results["near_opposites"] = near_opposites(embedder, results["threshold"])
    results["near_opposites_at_shipped_default"] = near_opposites(embedder, DEFAULT_THRESHOLD)
    if args.ann:
        results["ann"] = ann_bench()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "semantic.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "semantic.md").write_text(table(results) + "\n")
    plot(results, args.out / "semantic.png")
    print(table(results))
    print(json.dumps({"threshold": results["threshold"], "at_threshold": at,
                      "near_opposites": {k: v for k, v in results["near_opposites"].items() if k != "hit_pairs"},
                      "check_rejects": {s: results[s]["check_rejects_paraphrases"] for s in ("calibration",
                                                                                          "heldout")}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
