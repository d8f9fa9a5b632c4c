"""Latency and throughput of a scorer: the per-request cost the router pays.

Latency is measured for a single prompt of ``tokens`` tokens (after the scorer's own
preprocessing) on ``threads`` torch threads; throughput for batches of such prompts.
Wall-clock and process CPU time are both reported: on a shared machine the wall clock
includes waiting for a core, the CPU time is what one call costs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

FILLER = ("the router decides whether this question about thermodynamics history law and "
          "algebra needs the strong model or whether a small model answers it well")


def prompt_of_tokens(count: Callable[[str], int], tokens: int) -> str:
    """A plain-text prompt that tokenises to at least ``tokens`` tokens (special incl.)."""
    words: list[str] = []
    while count(" ".join(words)) < tokens:
        words.extend(FILLER.split())
    return " ".join(words)


def _token_counter(scorer: object) -> Callable[[str], int]:
    enc = getattr(scorer, "encoder", None)
    if enc is not None:
        return enc.token_count
    tok = scorer.tokenizer  # type: ignore[attr-defined]
    return lambda text: len(tok(text)["input_ids"])


def bench(scorer: object, tokens: int = 256, threads: int = 1, repeats: int = 50,
          batch_size: int = 32, batches: int = 3) -> dict:
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # the shipped numpy encoder: one thread per call already
        pass
    prompt = prompt_of_tokens(_token_counter(scorer), tokens)
    for _ in range(3):
        scorer.score([prompt])  # type: ignore[attr-defined]
    lat, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        scorer.score([prompt])  # type: ignore[attr-defined]
        lat.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    batch = [prompt] * batch_size
    t0 = time.perf_counter()
    for _ in range(batches):
        scorer.score(batch)  # type: ignore[attr-defined]
    elapsed = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {"model_version": getattr(scorer, "version", ""), "tokens": tokens,
            "threads": threads, "repeats": repeats,
            "latency_ms_p50": float(np.percentile(ms, 50)),
            "latency_ms_p99": float(np.percentile(ms, 99)),
            "cpu_ms_p50": float(np.percentile(np.array(cpu) * 1000, 50)),
            "load_avg_1m": os.getloadavg()[0],
            "batch_size": batch_size,
            "throughput_prompts_per_s": batch_size * batches / elapsed}


def write(result: dict, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(
        "| tokens | threads | p50 ms | p99 ms | CPU ms p50 | batch | prompts/s | load |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"| {result['tokens']} | {result['threads']} | {result['latency_ms_p50']:.1f} | "
        f"{result['latency_ms_p99']:.1f} | {result['cpu_ms_p50']:.1f} | {result['batch_size']} | "
        f"{result['throughput_prompts_per_s']:.1f} | {result['load_avg_1m']:.1f} |\n")
    return out
