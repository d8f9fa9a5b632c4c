"""Micro-benchmark: how many vLLM KV events per second one core applies to the index.

Builds msgpack batches shaped like vLLM's (``[ts, [events...]]``): chains of
``BlockStored`` events (one block each, with parent hashes, as a long prompt produces)
followed by ``BlockRemoved`` events that evict them, and times ``WorkerEvents`` applying
them to an ``ExactIndex``: decode, recomputing kvroute's own chain keys from the token
ids, and the index updates. Writes ``kv_events_bench.json`` and ``.md`` to ``--out``.

    python -m kvroute.benchmarks.kv_events_bench --events 200000 --out bench-out/kv-events
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import msgspec

from kvroute.router.kv_events import WorkerEvents
from kvroute.router.kv_index import ExactIndex


def make_batches(n_events: int, block_size: int, batch: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    events: list[dict] = []
    stored: list[int] = []
    next_hash = 1
    while len(events) < n_events:
        parent = None
        for _ in range(16):  # a 16-block prompt: a chain of stores
            tokens = [rng.randrange(2048) for _ in range(block_size)]
            events.append({"type": "BlockStored", "block_hashes": [next_hash], "parent_block_hash": parent,
                           "token_ids": tokens, "block_size": block_size, "lora_id": None, "medium": "GPU"})
            stored.append(next_hash)
            parent, next_hash = next_hash, next_hash + 1
        while len(stored) > 256:  # the cache is full: evict the oldest
            events.append({"type": "BlockRemoved", "block_hashes": [stored.pop(0)], "medium": "GPU"})
    events = events[:n_events]
    return [msgspec.msgpack.encode([time.time(), events[i:i + batch]]) for i in range(0, len(events), batch)]


def run(n_events: int, block_size: int, batch: int) -> dict:
    payloads = make_batches(n_events, block_size, batch)
    index = ExactIndex(capacity_blocks=100_000)
    worker = WorkerEvents("http://w:8000", index)
    start = time.process_time()
    for payload in payloads:
        worker.apply_payload(payload)
    cpu = time.process_time() - start
    return {"events": n_events, "block_size": block_size, "batch": batch, "cpu_s": round(cpu, 3),
            "events_per_s_per_core": round(n_events / cpu), "blocks_held": index.blocks_of("http://w:8000")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kv_events_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--block-size", type=int, default=16, help="vLLM's GPU default is 16")
    p.add_argument("--batch", type=int, default=32, help="events per published batch")
    p.add_argument("--out", default="bench-out/kv-events")
    args = p.parse_args(argv)
    result = run(args.events, args.block_size, args.batch)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_events_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    table = ("| events | block size | batch | CPU s | events/s per core |\n|---|---|---|---|---|\n"
             f"| {result['events']} | {result['block_size']} | {result['batch']} | {result['cpu_s']} | "
             f"{result['events_per_s_per_core']} |\n")
    (out / "kv_events_bench.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
