"""Exact mode: track each worker's KV cache from vLLM's own KV-cache events.

Each worker publishes ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` over a
ZMQ PUB socket as (topic, 8-byte sequence number, msgpack ``[ts, [events...]]``). A
subscriber per worker applies them to an ``ExactIndex``:

* ``BlockStored`` carries the blocks' token ids. kvroute recomputes its own chain key
  from them with ``router.prefix.chain_keys``, the same function requests use, so the
  index never depends on vLLM's hash seed. vLLM's hash -> our key is remembered per
  worker so that ``BlockRemoved`` (which names only vLLM hashes) can be resolved.
* A gap in sequence numbers means lost events. If the worker has a replay endpoint the
  missing batches are fetched from it; otherwise that worker's entries are dropped and
  rebuilt from new events. A sequence number that goes backwards means the worker
  restarted: its entries are dropped too.
* Malformed or unknown payloads are counted and skipped; they never stop the subscriber.

Every router replica subscribes to the same streams, so replicas share one exact view of
the fleet's caches without any shared store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any
from urllib.parse import urlparse

import msgspec
import zmq
import zmq.asyncio

from kvroute.router.config import KvEventsConfig
from kvroute.router.index import discard_holder, evict_oldest, longest_prefixes, match_all
from kvroute.router.prefix import chain_keys

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
# A sequence number that goes back this far (or to nearly 0) means the worker restarted;
# a smaller step back is a batch we already applied from the replay buffer.
RESTART_SEQ = 16
RESTART_DISTANCE = 1000


class ExactIndex:
    """Block key -> workers, confirmed by events, plus short-lived speculative entries.

    Speculative entries cover requests in flight, whose blocks vLLM has not reported yet;
    they last while the request is in flight (at most ``in_flight_ttl_s``, since a slow
    worker may queue a request for seconds before it computes a block) and expire
    ``speculative_ttl_s`` after it completes unless an event confirms them. Confirmed
    entries mirror the worker's cache, so they are bounded by its real size; a safety cap
    per worker (``capacity_blocks``) bounds memory even if removals were missed.
    Everything runs on the event loop, so no locking is needed.
    """

    def __init__(self, capacity_blocks: int, speculative_ttl_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, in_flight_ttl_s: float = 120.0):
        self.capacity_blocks = capacity_blocks
        self.ttl = speculative_ttl_s
        self.in_flight_ttl = max(in_flight_ttl_s, speculative_ttl_s)
        self.clock = clock
        self._confirmed: dict[str, OrderedDict[int, None]] = {}
        self._speculative: dict[str, OrderedDict[int, float]] = {}
        # settled entries in settle order (so by expiry), which _expire trims from the
        # front: they would otherwise wait behind an older request still in flight
        self._settled: dict[str, OrderedDict[int, float]] = {}
        self._holders: dict[int, set[str]] = {}

    # -- the PrefixIndex interface the policies use --------------------------------------

    def __len__(self) -> int:
        return sum(len(c) for c in self._confirmed.values()) + sum(len(s) for s in self._speculative.values())

    def blocks_of(self, worker: str) -> int:
        # confirmed plus in flight (/health's index_blocks): a prefix just sent counts
        # before vLLM reports it
        self._expire(worker)
        return len(self._confirmed.get(worker, ())) + len(self._speculative.get(worker, ()))

    def capacity_of(self, worker: str) -> int:
        return self.capacity_blocks

    def set_capacity(self, worker: str, blocks: int) -> None:
        pass  # the worker's own evictions bound it; see capacity_blocks for the safety cap

    def match(self, keys: Sequence[int], workers: Iterable[str]) -> dict[str, int]:
        return match_all(self, keys, workers)

    def holders(self, keys: Sequence[int], workers: Container[str]) -> dict[str, int]:
        now = self.clock()
        return longest_prefixes(
            keys, workers, lambda key: [w for w in self._holders.get(key, ()) if self._holds(w, key, now)])

    def insert(self, worker: str, keys: Sequence[int]) -> None:
        """Speculative: a request with these blocks was just sent to ``worker``."""
        confirmed = self._confirmed.get(worker, {})
        spec = self._speculative.setdefault(worker, OrderedDict())
        expiry = self.clock() + self.in_flight_ttl
        for key in keys:
            if key in confirmed:
                continue
            spec[key] = expiry
            spec.move_to_end(key)
            self._holders.setdefault(key, set()).add(worker)
        self._expire(worker)

    def settle(self, worker: str, keys: Sequence[int]) -> None:
        """The request that sent ``keys`` to ``worker`` is done: unconfirmed ones expire soon."""
        spec = self._speculative.get(worker)
        if not spec:
            return
        expiry = self.clock() + self.ttl
        settled = self._settled.setdefault(worker, OrderedDict())
        for key in keys:
            if key in spec and expiry < spec[key]:
                spec[key] = settled[key] = expiry
                settled.move_to_end(key)

    def drop_worker(self, worker: str) -> None:
        self._settled.pop(worker, None)
        for key in list(self._confirmed.pop(worker, ())) + list(self._speculative.pop(worker, ())):
            self._discard(key, worker)

    def retain_workers(self, workers: Iterable[str]) -> None:
        keep = set(workers)
        for w in [w for w in set(self._confirmed) | set(self._speculative) if w not in keep]:
            self.drop_worker(w)

    # -- events ---------------------------------------------------------------------------

    def stored(self, worker: str, keys: Iterable[int]) -> None:
        conf = self._confirmed.setdefault(worker, OrderedDict())
        spec = self._speculative.get(worker, {})
        for key in keys:
            conf[key] = None
            conf.move_to_end(key)
            spec.pop(key, None)
            self._holders.setdefault(key, set()).add(worker)
        evict_oldest(conf, self.capacity_blocks, self._holders, worker)

    def removed(self, worker: str, keys: Iterable[int]) -> None:
        conf = self._confirmed.get(worker)
        if conf is None:
            return
        spec = self._speculative.get(worker, {})
        for key in keys:
            if conf.pop(key, 0) is None and key not in spec:
                self._discard(key, worker)

    def confirmed_blocks(self, worker: str) -> set[int]:
        return set(self._confirmed.get(worker, ()))

    # -- internals ------------------------------------------------------------------------

    def _holds(self, worker: str, key: int, now: float) -> bool:
        if key in self._confirmed.get(worker, ()):
            return True
        expiry = self._speculative.get(worker, {}).get(key)
        return expiry is not None and expiry > now

    def _expire(self, worker: str) -> None:
        now = self.clock()
        spec = self._speculative.get(worker, {})
        conf = self._confirmed.get(worker, {})
        settled = self._settled.get(worker, {})
        while settled:
            key, expiry = next(iter(settled.items()))
            if expiry > now:
                break
            settled.popitem(last=False)
            if spec.get(key) == expiry:  # not confirmed or sent again since
                del spec[key]
                if key not in conf:
                    self._discard(key, worker)
        while spec:
            key, expiry = next(iter(spec.items()))
            if expiry > now and len(spec) <= self.capacity_blocks:
                break
            spec.popitem(last=False)
            if key not in conf:
                self._discard(key, worker)

    def _discard(self, key: int, worker: str) -> None:
        discard_holder(self._holders, key, worker)


class EventCounter:
    """Where the subscriber reports what it saw (Prometheus in the app, a dict in tests)."""

    def event(self, worker: str, kind: str, n: int = 1) -> None: ...

    def gap(self, worker: str) -> None: ...


class WorkerEvents:
    """Applies one worker's event batches to the index. Pure: no sockets here."""

    def __init__(self, worker: str, index: ExactIndex, counter: EventCounter | None = None):
        self.worker = worker
        self.index = index
        self.counter = counter or EventCounter()
        self.last_seq: int | None = None
        self._ours: dict[int, int] = {}  # vLLM block hash -> our chain key

    def reset(self) -> None:
        self.index.drop_worker(self.worker)
        self._ours.clear()

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

    def apply_event(self, event: Any) -> None:
        try:
            kind = event["type"] if isinstance(event, dict) else event[0]
            if kind == "BlockStored":
                self._stored(event)
            elif kind == "BlockRemoved":
                hashes = event["block_hashes"] if isinstance(event, dict) else event[1]
                ours = [k for k in (self._ours.pop(h, None) for h in hashes) if k is not None]
                self.index.removed(self.worker, ours)
            elif kind == "AllBlocksCleared":
                self.reset()
            else:
                self.counter.event(self.worker, "unknown")
                return
            self.counter.event(self.worker, kind)
        except (KeyError, TypeError, IndexError, ValueError, OverflowError):
            self.counter.event(self.worker, "invalid")

    def _stored(self, event: dict) -> None:
        hashes = event["block_hashes"]
        tokens = event["token_ids"]
        block_size = int(event["block_size"])
        parent_hash = event.get("parent_block_hash")
        if len(tokens) != len(hashes) * block_size:
            raise ValueError("token_ids do not fill the blocks")
        if parent_hash is None:
            parent = 0
        else:
            parent = self._ours.get(parent_hash)
            if parent is None:
                # The parent was stored before we subscribed: these blocks can't be keyed.
                self.counter.event(self.worker, "unresolved")
                return
        keys = chain_keys(tokens, block_size, parent)
        self._ours.update(zip(hashes, keys))
        self.index.stored(self.worker, keys)


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
            resuming = events.last_seq is not None
            start = events.last_seq + 1 if resuming else 0
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
                if replay_endpoint is not None:
                    events.last_seq = last
                    if await replay(ctx, replay_endpoint, last + 1, events) and events.last_seq >= seq:
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
        wanted = set(worker_urls)
        for url in wanted - set(self._subs):
            endpoint, replay_ep = endpoints_for(url, cfg)
            events = WorkerEvents(url, index, self.counter)
            self._subs[url] = (supervise(self.ctx, endpoint, replay_ep, cfg.topic, events), events)
            log.info("kv events: subscribed to %s for %s", endpoint, url)
        for url in [u for u in self._subs if u not in wanted and self._subs[u][1].index is index]:
            task, events = self._subs.pop(url)
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
