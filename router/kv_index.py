"""Exact mode's index: which KV blocks each worker's cache holds, from vLLM's KV events.

vLLM reports every block it caches or evicts (``BlockStored`` / ``BlockRemoved`` /
``AllBlocksCleared``). ``EventApplier`` applies one worker's decoded events to an
``ExactIndex``:

* ``BlockStored`` carries the blocks' token ids. kvroute recomputes its own chain key
  from them with ``router.prefix.chain_keys``, the same function requests use, so the
  index never depends on vLLM's hash seed. vLLM's hash -> our key is remembered per
  worker so that ``BlockRemoved`` (which names only vLLM hashes) can be resolved. A chain
  that starts with a LoRA adapter (``lora_name``) or a cache salt (the first block's
  ``extra_keys``) starts from their key (``router.prefix.root_key``), as requests do.
* Malformed or unknown events are counted and skipped; they never stop the subscriber.

``ExactIndex`` answers the policies' prefix matches from the confirmed blocks plus
short-lived speculative entries for requests in flight, which vLLM has not reported yet.

This module knows nothing of how events arrive: the ZMQ subscribers, sequence numbers,
replay and payload decoding live in ``router.kv_events``, which feeds this index. Keeping
them apart lets the index be used, tested and benchmarked without sockets.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any, Protocol

from kvroute.router.index import discard_holder, evict_oldest, longest_prefixes, match_all
from kvroute.router.prefix import chain_keys, root_key


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
        confirmed: Container[int] = self._confirmed.get(worker, ())
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
        spec: dict[int, float] = self._speculative.get(worker, {})
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
        spec: dict[int, float] = self._speculative.get(worker, {})
        for key in keys:
            if conf.pop(key, 0) is None and key not in spec:
                self._discard(key, worker)

    def confirmed_blocks(self, worker: str) -> set[int]:
        return set(self._confirmed.get(worker, ()))

    def adopt(self, worker: str, other: ExactIndex) -> None:
        """Take ``worker``'s confirmed blocks from ``other``, oldest first: a pool that joins a
        worker whose events another pool already reads starts from what it holds."""
        self.stored(worker, list(other._confirmed.get(worker, ())))

    # -- internals ------------------------------------------------------------------------

    def _holds(self, worker: str, key: int, now: float) -> bool:
        if key in self._confirmed.get(worker, ()):
            return True
        spec = self._speculative.get(worker)
        expiry = spec.get(key) if spec is not None else None
        return expiry is not None and expiry > now

    def _expire(self, worker: str) -> None:
        now = self.clock()
        spec: OrderedDict[int, float] = self._speculative.get(worker) or OrderedDict()
        conf: Container[int] = self._confirmed.get(worker, ())
        settled: OrderedDict[int, float] = self._settled.get(worker) or OrderedDict()
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


class EventCounter(Protocol):
    """Where the subscriber reports what it saw (Prometheus in the app, a dict in tests)."""

    def event(self, worker: str, kind: str, n: int = 1) -> None: ...

    def gap(self, worker: str) -> None: ...


class _NoCounter:
    def event(self, worker: str, kind: str, n: int = 1) -> None:
        pass

    def gap(self, worker: str) -> None:
        pass


class EventApplier:
    """Applies one worker's decoded events to the index. Pure: no sockets, no decoding;
    ``router.kv_events.WorkerEvents`` adds sequence numbers and payload decoding."""

    def __init__(self, worker: str, index: ExactIndex, counter: EventCounter | None = None):
        self.worker = worker
        # Every pool the worker serves in (one server under several names, or a base model
        # and its LoRA adapters): each index keeps the blocks, and matches its own keys.
        self.indexes = [index]
        self.counter: EventCounter = counter or _NoCounter()
        self._ours: dict[int, int] = {}  # vLLM block hash -> our chain key

    def reset(self) -> None:
        for index in self.indexes:
            index.drop_worker(self.worker)
        self._ours.clear()

    def apply_event(self, event: Any) -> None:
        try:
            kind = event["type"] if isinstance(event, dict) else event[0]
            if kind == "BlockStored":
                self._stored(event)
            elif kind == "BlockRemoved":
                hashes = event["block_hashes"] if isinstance(event, dict) else event[1]
                ours = [k for k in (self._ours.pop(h, None) for h in hashes) if k is not None]
                for index in self.indexes:
                    index.removed(self.worker, ours)
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
            parent = _root(event)
        else:
            known = self._ours.get(parent_hash)
            if known is None:
                # The parent was stored before we subscribed: these blocks can't be keyed.
                self.counter.event(self.worker, "unresolved")
                return
            parent = known
        keys = chain_keys(tokens, block_size, parent)
        self._ours.update(zip(hashes, keys))
        for index in self.indexes:
            index.stored(self.worker, keys)


def _root(event: dict) -> int:
    """The key a chain of blocks starts from: its LoRA adapter and cache salt. vLLM lists the
    first block's extra keys untagged: the adapter's name (with one), then pairs for images,
    the salt, and digests of prompt embeddings."""
    lora = event.get("lora_name")
    extra = event.get("extra_keys") or [None]
    first = list(extra[0] or [])[1 if lora is not None else 0:]
    salt = next((k for k in first if isinstance(k, str)), None)
    return root_key(lora if isinstance(lora, str) else None, salt)
