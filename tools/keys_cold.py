"""Exact mode's prompt -> block keys, back to back and after idle gaps, stage by stage.

    python tools/keys_cold.py [--requests 250] [--gap-ms 50]

Runs ``PromptTokenizer`` on the tiny model's tokenizer over the overhead benchmark's prompts
(16 groups sharing a ~1,000-token system prompt), in this process: first one prompt after
another, then with ``--gap-ms`` of sleep before each, as a router at low load sees them.
Prints each stage's median wall time in µs. The gap shows what a lightly loaded router's
latency pays for caches and cores that went cold between requests, which the CPU per
request at full load does not.
"""

from __future__ import annotations

import argparse
import statistics
import time

from kvroute.benchmarks.workloads import WorkloadSpec, iter_records
from kvroute.router.local.tinymodel import build_tiny_model
from kvroute.router.prefix import PromptTokenizer, chain_keys

STAGES = ("chat template", "cut at special tokens", "token ids", "block hashes")


def stages(tok: PromptTokenizer, bodies: list[dict], gap_s: float) -> dict[str, float]:
    spent: dict[str, list[float]] = {s: [] for s in STAGES}
    for body in bodies:
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        text = tok.render_chat(body)
        t1 = time.perf_counter()
        pieces = tok.pieces(text)
        tok.uncached_chars(pieces)
        t2 = time.perf_counter()
        ids = tok.encode_pieces(pieces)
        t3 = time.perf_counter()
        chain_keys(ids, 32)
        t4 = time.perf_counter()
        for stage, s in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            spent[stage].append(s)
    return {s: 1e6 * statistics.median(v) for s, v in spent.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=250)
    p.add_argument("--gap-ms", type=float, default=50.0)
    args = p.parse_args()
    tok = PromptTokenizer(str(build_tiny_model()))
    bodies = [r.body for r in iter_records(WorkloadSpec(requests=100 + 2 * args.requests, groups=16,
                                                        prefix_tokens=1000, max_tokens=1))]
    stages(tok, bodies[:100], 0)  # fill the piece cache with the system prompts
    tight = stages(tok, bodies[100 : 100 + args.requests], 0)
    gapped = stages(tok, bodies[100 + args.requests :], args.gap_ms / 1e3)
    print(f"| stage | back to back (µs) | after {args.gap_ms:g} ms idle (µs) |\n|---|---|---|")
    for s in STAGES:
        print(f"| {s} | {tight[s]:.1f} | {gapped[s]:.1f} |")
    print(f"| all | {sum(tight.values()):.1f} | {sum(gapped.values()):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
