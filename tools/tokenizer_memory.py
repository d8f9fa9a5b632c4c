"""Memory the router's tokenizers take for a model and N LoRA adapters on one tokenizer folder.

    python tools/tokenizer_memory.py TOKENIZER_FOLDER [--adapters 8]

Builds the router's pools (``ModelRoutes``) for a base model and ``--adapters`` adapters
(``lora: true``, ``workers_from`` the base), all naming the same tokenizer folder, and
prints the growth of this process's resident memory and how many tokenizer objects the
pools hold. The router's modules are imported before the first reading, so only the
tokenizers and the pools count.
"""

from __future__ import annotations

import argparse
import gc

from kvroute.router.config import config_from_dict
from kvroute.router.metrics import RouterMetrics
from kvroute.router.routes import Executors, ModelRoutes


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tokenizer", help="a local tokenizer folder")
    parser.add_argument("--adapters", type=int, default=8)
    args = parser.parse_args()
    before = rss_mb()
    models = [{"name": "base", "workers": ["http://127.0.0.1:9"], "tokenizer": args.tokenizer}] + [
        {"name": f"adapter-{i}", "lora": True, "workers_from": "base", "tokenizer": args.tokenizer}
        for i in range(args.adapters)]
    routes = ModelRoutes(config_from_dict({"models": models}), Executors(), RouterMetrics())
    gc.collect()
    copies = len({id(r.prefixer.tokenizer) for r in routes.by_key.values()})
    print(f"base + {args.adapters} adapters: +{rss_mb() - before:.1f} MB resident, {copies} tokenizer object(s)")


if __name__ == "__main__":
    main()
