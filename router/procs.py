"""``kvroute serve --procs N``: a supervisor that runs N router processes on one port.

One process runs one event loop on one core. The supervisor starts N copies of the same
``kvroute serve`` command line, each told its slot (``--proc-index``); each binds the port
with SO_REUSEPORT, so the kernel spreads incoming connections over them (Linux). A process
loads its own tokenizers and classifier, runs its own health checks, scrapes and KV-event
subscribers, and keeps its own routing view (router/siblings.py: what each adds).

* Readiness: a process sends one byte on its supervisor socket once it serves. If one
  exits before every process is ready (a port in use, a tokenizer that fails to load) the
  supervisor stops the others and exits with that process's status.
* A process that exits later (a crash) is restarted, after 1 s, doubling up to 30 s while
  restarts keep failing within a minute; the others keep serving meanwhile.
* SIGTERM or SIGINT is forwarded to every process, which drains as one process does
  (router/server.py); a second signal is forwarded too and cuts what still runs. The
  supervisor exits when all have: 0 if each drained cleanly, else 1.
* Processes run in their own sessions, so a terminal's Ctrl-C or a ``kill`` of the
  supervisor's process group reaches them once, through the supervisor. If the supervisor
  dies without forwarding (SIGKILL), each process sees its supervisor socket close and drains.

The supervisor itself only parses the config and waits; it loads no tokenizer or model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 30.0
STABLE_S = 60.0  # a process that served this long resets the restart delay


class StartupFailed(Exception):
    def __init__(self, index: int, returncode: int):
        super().__init__(f"process {index} exited with {returncode} before serving")
        self.index, self.returncode = index, returncode


class Supervisor:
    """Start ``procs`` copies of ``argv`` (``kvroute`` arguments), keep them running, and
    forward signals to them."""

    def __init__(self, argv: list[str], procs: int):
        self.argv = argv
        self.procs = procs
        self.folder = Path(tempfile.mkdtemp(prefix="kvroute-procs-"))  # mode 0700: the private sockets
        self.children: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = False
        self.serving = False  # every process was ready once: from now on, crashes restart
        self._stop = asyncio.Event()
        self._ready = [asyncio.Event() for _ in range(procs)]
        self._all = asyncio.Event()  # every process ready at once: start-up is over
        self._held: set[int] = set()  # processes a SIGHUP came for while they started

    def command(self, index: int, fd: int) -> list[str]:
        return [sys.executable, "-m", "kvroute.router.cli", *self.argv, "--proc-index", str(index),
                "--procs-dir", str(self.folder), "--supervisor-fd", str(fd)]

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        sigs = (signal.SIGTERM, signal.SIGINT)
        for sig in sigs:
            loop.add_signal_handler(sig, self.forward, sig)
        loop.add_signal_handler(signal.SIGHUP, self.pass_on, signal.SIGHUP)  # each process reloads
        keepers = [asyncio.create_task(self._keep(i)) for i in range(self.procs)]
        try:
            await self._all_ready(keepers)
            if not self.stopping:
                pids = ", ".join(str(p.pid) for p in self.children.values())
                log.info("%d processes serving (pids %s)", self.procs, pids)
            results = await asyncio.gather(*keepers, return_exceptions=True)
        except StartupFailed as exc:
            log.error("%s; stopping the others", exc)
            self.forward(signal.SIGTERM)
            await asyncio.gather(*keepers, return_exceptions=True)
            return exc.returncode if exc.returncode > 0 else 1
        finally:
            for sig in (*sigs, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            shutil.rmtree(self.folder, ignore_errors=True)
        clean = (0, -signal.SIGTERM, -signal.SIGINT)  # killed before its handlers were in place
        return 0 if all(r in clean for r in results) else 1

    async def _all_ready(self, keepers: list[asyncio.Task]) -> None:
        """Until every process is ready or a signal came; a keeper that ends first raises
        its start-up failure."""
        ready = asyncio.ensure_future(self._all.wait())
        stop = asyncio.ensure_future(self._stop.wait())
        waiting: list[asyncio.Future[Any]] = [ready, stop, *keepers]
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for waiter in (ready, stop):
            waiter.cancel()
        if ready in done:
            self.serving = True
            return
        for task in keepers:
            if task.done():
                task.result()  # StartupFailed; a keeper stopped by a signal returns

    def pass_on(self, sig: signal.Signals) -> None:
        """Pass a signal on to every process, stopping nothing (SIGHUP: reload). One still
        starting has no handler for it yet: it gets the signal once it is ready."""
        for index, proc in self.children.items():
            if proc.returncode is not None:
                continue
            if not self._ready[index].is_set():
                self._held.add(index)
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    def forward(self, sig: signal.Signals) -> None:
        """Pass a signal on; the first one also stops restarts."""
        if not self.stopping:
            log.info("%s: stopping %d processes (each drains)", sig.name, len(self.children))
        self.stopping = True
        self._stop.set()
        for proc in self.children.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def _keep(self, index: int) -> int:
        """Run process ``index``; restart it when it crashes after start-up."""
        loop = asyncio.get_running_loop()
        delay = RESTART_DELAY_S
        while True:
            ours, theirs = socket.socketpair()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.command(index, theirs.fileno()), pass_fds=(theirs.fileno(),),
                    stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
            finally:
                theirs.close()
            self.children[index] = proc
            started = loop.time()
            reader, writer = await asyncio.open_connection(sock=ours)
            try:
                if await reader.read(1):
                    self._ready[index].set()
                    if index in self._held:
                        self._held.discard(index)
                        with contextlib.suppress(ProcessLookupError):
                            proc.send_signal(signal.SIGHUP)
                    if self.serving:
                        log.info("process %d (pid %d) serves again", index, proc.pid)
                    if all(e.is_set() for e in self._ready):
                        self._all.set()
                returncode = await proc.wait()
            finally:
                writer.close()
            if self.stopping:
                return returncode
            if not self.serving:
                raise StartupFailed(index, returncode)
            delay = RESTART_DELAY_S if loop.time() - started > STABLE_S else delay
            log.error("process %d (pid %d) exited with %d; restarting it in %gs", index, proc.pid,
                      returncode, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self.stopping:
                return 0
            self._ready[index].clear()
            delay = min(delay * 2, MAX_RESTART_DELAY_S)


def supervise(argv: list[str], procs: int) -> int:
    """``kvroute serve`` with ``procs`` > 1: run the processes until they have drained."""
    async def main() -> int:
        return await Supervisor(argv, procs).run()

    return asyncio.run(main())

