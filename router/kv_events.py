"""Exact mode's transport: receive vLLM's KV-cache events and feed them to the index.

Each worker publishes ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` over a
ZMQ PUB socket as (topic, 8-byte sequence number, msgpack ``[ts, [events...]]``). A
subscriber per worker (``EventHub`` keeps one per pool member) decodes the batches and
hands the events to ``router.kv_index``, which turns them into the ``ExactIndex``:

* A gap in sequence numbers means lost events. If the worker has a replay endpoint the
  missing batches are fetched from it; otherwise that worker's entries are dropped and
  rebuilt from new events. A sequence number that goes backwards means the worker
  restarted: its entries are dropped too.
* Malformed payloads and frames are counted and skipped; they never stop the
  subscriber, and one that fails unexpectedly is restarted.

Sockets, sequence numbers and decoding live here so that the index stays pure (no ZMQ,
no msgpack) and can be tested and benchmarked on its own. Every router replica
subscribes to the same streams, so replicas share one exact view of the fleet's caches
without any shared store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from urllib.parse import urlparse

import msgspec
import zmq
import zmq.asyncio

from kvroute.router.config import KvEventsConfig
from kvroute.router.kv_index import EventApplier, EventCounter, ExactIndex

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
# A sequence number that goes back this far (or to nearly 0) means the worker restarted;
# a smaller step back is a batch we already applied from the replay buffer.
RESTART_SEQ = 16
RESTART_DISTANCE = 1000


class WorkerEvents(EventApplier):
    """One worker's event stream: sequence numbers and payload decoding around the applier."""

    def __init__(self, worker: str, index: ExactIndex, counter: EventCounter | None = None):
        super().__init__(worker, index, counter)
        self.last_seq: int | None = None

    def check_seq(self, seq: int) -> str:
        """'ok', 'gap' (events were lost), 'duplicate' (a batch seen already, e.g. queued
        while a replay applied it) or 'restart' (the worker's sequence began again)."""
        last = self.last_seq
        if last is None or seq == last + 1:
            self.last_seq = seq
            return "ok"
        if seq > last:
            self.last_seq = seq
            return "gap"
        if seq < RESTART_SEQ or seq < last - RESTART_DISTANCE:
            self.last_seq = seq
            return "restart"
        return "duplicate"

    def apply_payload(self, payload: bytes) -> None:
        try:
            batch = msgspec.msgpack.decode(payload)
            events = batch[1]
            if not isinstance(events, list):
                raise TypeError("events is not a list")
        except (msgspec.DecodeError, TypeError, IndexError, KeyError):
            self.counter.event(self.worker, "invalid")
            return
        for event in events:
            self.apply_event(event)


async def replay(ctx: zmq.asyncio.Context, endpoint: str, start_seq: int, events: WorkerEvents,
                 strict: bool = True, timeout_s: float = 2.0) -> bool:
    """Apply buffered batches from ``start_seq`` on, fetched from vLLM's replay endpoint.

    True on success. ``strict``: the buffer must still hold ``start_seq`` itself (gap
    repair); otherwise whatever it holds is taken (a replica catching up at start).
    """
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(endpoint)
        await sock.send_multipart((b"", start_seq.to_bytes(8, "big")))
        first = True
        while True:
            if not await sock.poll(timeout_s * 1000):
                return False
            frames = await sock.recv_multipart()
            _empty, _topic, seq_bytes, payload = frames[-4:]
            if seq_bytes == END_SEQ:
                return True
            seq = int.from_bytes(seq_bytes, "big")
            if first and strict and seq != start_seq:
                return False  # the buffer no longer holds what we missed
            first = False
            events.last_seq = seq
            events.apply_payload(payload)
    except (zmq.ZMQError, ValueError):
        return False
    finally:
        sock.close()


async def subscribe(ctx: zmq.asyncio.Context, endpoint: str, replay_endpoint: str | None, topic: str,
                    events: WorkerEvents) -> None:
    """Run until cancelled: receive one worker's events and keep the index exact.

    On start the worker's replay buffer is read first (when it has a replay endpoint), so
    a replica started late, or a subscriber that was paused, catches up.
    """
    sock = ctx.socket(zmq.SUB)
    sock.linger = 0
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.connect(endpoint)
    sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    replayed_until = -1
    try:
        if replay_endpoint is not None:
            resumed_at = events.last_seq
            resuming = resumed_at is not None
            start = resumed_at + 1 if resumed_at is not None else 0
            if await replay(ctx, replay_endpoint, start, events, strict=resuming):
                replayed_until = events.last_seq if events.last_seq is not None else -1
            elif resuming:
                events.counter.gap(events.worker)
                events.reset()
                events.last_seq = None
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3 or len(frames[1]) != 8:
                events.counter.event(events.worker, "invalid")
                continue
            _topic, seq_bytes, payload = frames
            seq = int.from_bytes(seq_bytes, "big")
            if seq <= replayed_until:
                continue  # already applied from the replay buffer
            replayed_until = -1
            last = events.last_seq
            state = events.check_seq(seq)
            if state == "duplicate":
                continue
            if state == "restart":
                log.warning("kv events: %s restarted (seq %s after %s); dropping its entries",
                            events.worker, seq, last)
                events.reset()
            elif state == "gap":
                events.counter.gap(events.worker)
                if replay_endpoint is not None and last is not None:  # a gap follows a known sequence
                    events.last_seq = last
                    if (await replay(ctx, replay_endpoint, last + 1, events)
                            and events.last_seq is not None and events.last_seq >= seq):
                        # Repaired. Batches the replay applied may still be queued here: skip them.
                        replayed_until = events.last_seq
                        continue
                log.warning("kv events: lost events from %s (seq %s after %s); rebuilding",
                            events.worker, seq, last)
                events.reset()
                events.last_seq = seq
            events.apply_payload(payload)
    finally:
        sock.close()


def supervise(ctx: zmq.asyncio.Context, endpoint: str, replay_endpoint: str | None, topic: str,
              events: WorkerEvents) -> asyncio.Task:
    """A subscriber task that restarts itself if anything unexpected kills it."""

    async def run() -> None:
        while True:
            try:
                await subscribe(ctx, endpoint, replay_endpoint, topic, events)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("kv event subscriber for %s failed; restarting", events.worker)
                events.reset()
                events.last_seq = None
                await asyncio.sleep(1.0)

    task = asyncio.create_task(run())
    task.add_done_callback(lambda t: None if t.cancelled() else t.exception())
    return task


def endpoints_for(worker_url: str, cfg: KvEventsConfig) -> tuple[str, str | None]:
    """(events endpoint, replay endpoint or None) of a worker, from the config."""
    url = urlparse(worker_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    if ":" in host:
        host = f"[{host}]"
    if worker_url in cfg.endpoints:
        endpoint = cfg.endpoints[worker_url]
    elif cfg.port is not None:
        endpoint = f"tcp://{host}:{cfg.port}"
    else:
        endpoint = f"tcp://{host}:{port + cfg.port_offset}"
    replay_ep = None
    if cfg.replay_port is not None:
        replay_ep = f"tcp://{host}:{cfg.replay_port}"
    elif cfg.replay_port_offset is not None:
        replay_ep = f"tcp://{host}:{port + cfg.replay_port_offset}"
    return endpoint, replay_ep


class EventHub:
    """One subscriber per worker of every pool in exact mode, following membership."""

    def __init__(self, counter: EventCounter):
        self.counter = counter
        self.ctx = zmq.asyncio.Context()
        self._subs: dict[str, tuple[asyncio.Task, WorkerEvents]] = {}

    def sync(self, index: ExactIndex, cfg: KvEventsConfig, worker_urls: Iterable[str]) -> None:
        """Feed ``index`` the events of ``worker_urls``, and no others. A worker in several
        pools (one server under several names, a base model and its LoRA adapters) has one
        subscriber that feeds every pool's index."""
        wanted = set(worker_urls)
        for url in wanted:
            if url in self._subs:
                indexes = self._subs[url][1].indexes
                if index not in indexes:
                    index.adopt(url, indexes[0])  # the blocks stored before this pool joined
                    indexes.append(index)
                continue
            endpoint, replay_ep = endpoints_for(url, cfg)
            events = WorkerEvents(url, index, self.counter)
            self._subs[url] = (supervise(self.ctx, endpoint, replay_ep, cfg.topic, events), events)
            log.info("kv events: subscribed to %s for %s", endpoint, url)
        for url in [u for u in self._subs if u not in wanted and index in self._subs[u][1].indexes]:
            task, events = self._subs[url]
            events.indexes.remove(index)
            index.drop_worker(url)
            if not events.indexes:
                del self._subs[url]
                task.cancel()
                events.reset()

    async def close(self) -> None:
        tasks = [t for t, _ in self._subs.values()]
        self._subs.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.ctx.destroy(linger=0)
