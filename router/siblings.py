"""One process of ``kvroute serve --procs N``: what it adds to the app it serves.

The supervisor (``router/procs.py``) starts N of these on one port (SO_REUSEPORT: the
kernel spreads connections). Each serves the whole app on its own event loop, and also:

* listens on a private Unix socket, ``<procs dir>/<index>.sock``, that answers
  ``GET /snapshot`` with its own metrics as JSON (the socket's folder is readable by the
  router's user only);
* answers the public ``/metrics`` with the metrics of every process merged: counters and
  histograms summed, gauges as ``metrics.GAUGES_ACROSS_PROCS`` says (summed unless listed),
  plus ``kvroute_procs_merged``, how many processes the page covers (a process that does
  not answer its socket within ``SNAPSHOT_TIMEOUT_S``, e.g. while it restarts, is left out);
* tags every response ``x-kvroute-process: <index>``; ``/health`` and ``/readyz`` describe
  the process that took the connection;
* tells the supervisor it is ready (one byte on its supervisor socket, once serving), and
  drains as on SIGTERM when that socket closes: the supervisor is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Metric, generate_latest
from prometheus_client.samples import Sample

from kvroute.router import keys
from kvroute.router.metrics import GAUGES_ACROSS_PROCS, PROCS_MERGED

log = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT_S = 2.0
PROCESS_HEADER = "x-kvroute-process"


@dataclass(frozen=True)
class Slot:
    """Which process this is, where its siblings listen, and its line to the supervisor."""

    index: int
    procs: int
    folder: Path
    supervisor_fd: int | None = None

    def socket_path(self, index: int) -> Path:
        return self.folder / f"{index}.sock"


def install(app: web.Application, slot: Slot) -> None:
    """Add the merged ``/metrics`` and the process header; before the app starts (freezes)."""

    async def tag(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers[PROCESS_HEADER] = str(slot.index)

    @web.middleware
    async def merged_metrics(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/metrics" or request.method != "GET":
            return await handler(request)
        body = await merged_page(app[keys.METRICS].registry, slot)
        return web.Response(body=body, headers={"content-type": "text/plain; version=0.0.4; charset=utf-8"})

    app.on_response_prepare.append(tag)
    app.middlewares.append(merged_metrics)


async def start_private(app: web.Application, slot: Slot) -> web.AppRunner:
    """The private socket siblings read this process's metrics from."""
    registry = app[keys.METRICS].registry

    async def snapshot_handler(_request: web.Request) -> web.Response:
        page = await asyncio.get_running_loop().run_in_executor(None, snapshot, registry)
        return web.Response(body=json.dumps(page).encode(), content_type="application/json")

    private = web.Application()
    private.router.add_get("/snapshot", snapshot_handler)
    runner = web.AppRunner(private, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(slot.socket_path(slot.index))).start()
    return runner


def tell_ready(slot: Slot) -> None:
    if slot.supervisor_fd is not None:
        with contextlib.suppress(OSError):
            os.write(slot.supervisor_fd, b"R")


def watch_supervisor(slot: Slot, on_gone: Callable[[], None]) -> Callable[[], None]:
    """Call ``on_gone`` when the supervisor's end of the socket closes; returns the undo."""
    fd = slot.supervisor_fd
    if fd is None:
        return lambda: None
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)

    def readable() -> None:
        try:
            data = sock.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            on_gone()

    loop.add_reader(fd, readable)

    def undo() -> None:
        loop.remove_reader(fd)
        sock.close()

    return undo


# ---- metrics: one process's snapshot, and the merge of all of them --------------------

Page = list[dict[str, Any]]  # families: {name, type, doc, samples: [[name, labels, value], ...]}


def snapshot(registry: CollectorRegistry) -> Page:
    return [{"name": f.name, "type": f.type, "doc": f.documentation,
             "samples": [[s.name, s.labels, s.value] for s in f.samples]} for f in registry.collect()]


async def merged_page(registry: CollectorRegistry, slot: Slot) -> bytes:
    """This process's metrics and its siblings', merged, as Prometheus text."""
    loop = asyncio.get_running_loop()
    own = loop.run_in_executor(None, snapshot, registry)
    others = [_fetch(slot.socket_path(i)) for i in range(slot.procs) if i != slot.index]
    pages = [p for p in await asyncio.gather(own, *others) if p is not None]
    return await loop.run_in_executor(None, render_merged, pages)


async def _fetch(path: Path) -> Page | None:
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)),
                                         timeout=aiohttp.ClientTimeout(total=SNAPSHOT_TIMEOUT_S)) as session:
            async with session.get("http://kvroute/snapshot") as resp:
                resp.raise_for_status()
                page: Page = await resp.json()
                return page
    except (OSError, TimeoutError, aiohttp.ClientError, ValueError) as exc:
        log.debug("no metrics from %s: %s", path, exc)
        return None


def merge(pages: list[Page]) -> list[Metric]:
    """Sum counters and histograms sample by sample (``_created``: the earliest); merge
    gauges by ``GAUGES_ACROSS_PROCS`` (sum unless listed). Series present in only some
    processes are kept."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple, list[float]]] = {}
    for page in pages:
        for fam in page:
            if fam["name"] not in families:
                families[fam["name"]] = Metric(fam["name"], fam["doc"], fam["type"])
                values[fam["name"]] = {}
            series = values[fam["name"]]
            for name, labels, value in fam["samples"]:
                series.setdefault((name, tuple(sorted(labels.items()))), []).append(value)
    for fam_name, metric in families.items():
        how = GAUGES_ACROSS_PROCS.get(fam_name, "sum") if metric.type == "gauge" else "sum"
        for (name, labels), vals in values[fam_name].items():
            value = _combine("min" if name.endswith("_created") else how, vals)
            metric.samples.append(Sample(name, dict(labels), value, None, None))
    merged = Metric(PROCS_MERGED, "Processes whose metrics this page merges (kvroute serve --procs)", "gauge")
    merged.samples.append(Sample(PROCS_MERGED, {}, float(len(pages)), None, None))
    return [*families.values(), merged]


def _combine(how: str, vals: list[float]) -> float:
    if how == "sum":
        return float(sum(vals))
    if how == "mean":
        return sum(vals) / len(vals)
    if how == "max":
        return max(vals)
    return min(vals)


class _Families:
    def __init__(self, metrics: list[Metric]):
        self.metrics = metrics

    def collect(self) -> list[Metric]:
        return self.metrics


def render_merged(pages: list[Page]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merge(pages)))
    return generate_latest(registry)
