"""RSS of ``kvroute serve`` (tiny model's tokenizer) at idle and with N streams held open.

    python tools/stream_memory.py [N]

A fake worker (benchmarks/backends/mock.py) sends one event per stream and then stalls, so
every stream stays open in the router; RSS is read from /proc.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
from aiohttp import web

from kvroute.benchmarks.backends.mock import FAULTS, fake_worker
from kvroute.router.local.tinymodel import build_tiny_model

WORKER, ROUTER = 9880, 9890
URL = f"http://127.0.0.1:{ROUTER}"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def body(i: int, stream: bool) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": f"{i} " + "hello " * 50}],
            "max_tokens": 50, "stream": stream}


async def wait_ready(s: aiohttp.ClientSession) -> None:
    for _ in range(120):
        try:
            async with s.get(f"{URL}/health") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit("the router did not start")


async def main(n: int) -> None:
    app = fake_worker("w")
    app[FAULTS].update(stall_after_events=1, stall_mid_s=120)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", WORKER, backlog=4096).start()
    proc = subprocess.Popen([sys.executable, "-m", "kvroute.router.cli", "--log-level", "ERROR", "serve",
                             "--model", "tiny", "--worker", f"http://127.0.0.1:{WORKER}",
                             "--tokenizer", str(build_tiny_model()), "--host", "127.0.0.1", "--port", str(ROUTER)])
    opened: list[aiohttp.ClientResponse] = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            await wait_ready(s)
            for i in range(20):  # warm up
                async with s.post(f"{URL}/v1/chat/completions", json=body(i, False)) as r:
                    await r.read()
            await asyncio.sleep(1)
            idle = rss_mb(proc.pid)

            async def one(i: int) -> None:
                r = await s.post(f"{URL}/v1/chat/completions", json=body(i, True))
                await r.content.readline()  # the first event: the stream is open
                opened.append(r)

            await asyncio.gather(*(one(i) for i in range(n)))
            await asyncio.sleep(2)
            held = rss_mb(proc.pid)
            print(f"idle {idle:.0f} MB; with {len(opened)} open streams {held:.0f} MB: "
                  f"{(held - idle) / len(opened) * 1000:.0f} MB per 1,000")
            for r in opened:
                r.close()
    finally:
        proc.kill()
        proc.wait(30)
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
