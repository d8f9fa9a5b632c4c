"""consistent_hash: bounded-load consistent hashing on the prompt's first KV block.

Algorithm: each worker owns ``vnodes`` points on a 64-bit ring (xxhash of its URL and a
point number). A request hashes to the ring by its first block key (its session key or
its whole short prompt when it has no full block) and walks clockwise to the first
worker whose queue is below ``ceil(load_factor * (total + 1) / n)`` (Mirrokni et al.,
"Consistent Hashing with Bounded Loads"). Two router replicas with the same workers
therefore pick alike on an idle fleet, and a hot key spills to the next worker when its
owner is full.

Cost: O(log(n * vnodes)) to find the start, then a short walk (O(n) at worst). Knobs: ``vnodes``
(default 64), ``load_factor`` (default 1.25). Fallback with no key: least in-flight.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import xxhash

from kvroute.router.errors import ConfigError
from kvroute.router.policies.base import Policy, RequestContext, pick_random_min
from kvroute.router.upstream.workers import Worker


class HashRing:
    """A consistent-hash ring over worker URLs.

    The ring holds every URL it has been asked about and is rebuilt only when a new one
    appears, so the per-request cost is a binary search plus a short walk: callers pass
    subsets (healthy, eligible) and URLs outside the subset are simply skipped.
    """

    def __init__(self, vnodes: int = 64):
        self.vnodes = vnodes
        self._members: set[str] = set()
        self._points: list[int] = []
        self._owners: list[str] = []
        self._checked: Collection[str] | None = None  # the last ``urls`` known to be members

    def _rebuild(self, urls: set[str]) -> None:
        ring = sorted(
            (xxhash.xxh3_64_intdigest(f"{url}#{i}".encode()), url) for url in urls for i in range(self.vnodes)
        )
        self._points = [p for p, _ in ring]
        self._owners = [u for _, u in ring]
        self._members = set(urls)

    def walk(self, key: int, urls: Collection[str]) -> Iterator[str]:
        """Distinct URLs of ``urls`` in ring order from ``key``, lazily.

        ``urls`` is a set or a mapping keyed by URL that the caller does not change
        afterwards: the check that the ring holds all of them is skipped when the same
        object comes again, so a walk costs its steps, not the fleet's size.
        """
        if urls is not self._checked:
            if not all(u in self._members for u in urls):
                self._rebuild(self._members | set(urls))
            self._checked = urls
        if not urls:
            return
        n = len(self._owners)
        start = bisect.bisect_left(self._points, key)
        seen: set[str] = set()
        for i in range(n):
            url = self._owners[(start + i) % n]
            if url in urls and url not in seen:
                seen.add(url)
                yield url
                if len(seen) == len(urls):
                    return

    def forget(self, keep: Iterable[str]) -> None:
        """Drop workers that left (called when membership changes)."""
        keep = set(keep)
        if keep != self._members:
            self._rebuild(keep)
            self._checked = None

    def pick(self, key: int, workers: Sequence[Worker], load_factor: float) -> Worker | None:
        """First worker clockwise from ``key`` whose load is under the bound."""
        if not workers:
            return None
        by_url = {w.url: w for w in workers}
        total = sum(w.queue_depth for w in workers)
        bound = math.ceil(load_factor * (total + 1) / len(workers))
        first = None
        for url in self.walk(key, by_url):
            if by_url[url].queue_depth < bound:
                return by_url[url]
            first = first or by_url[url]
        return first


def route_key(ctx: RequestContext) -> int | None:
    if ctx.block_keys:
        return ctx.block_keys[0]
    if ctx.session_key:
        return xxhash.xxh3_64_intdigest(ctx.session_key.encode())
    return None


def validate_ring_options(options: Mapping[str, Any], key: str, extra: frozenset[str] = frozenset()) -> None:
    allowed = {"vnodes", "load_factor"} | set(extra)
    for k, v in options.items():
        if k not in allowed:
            raise ConfigError(f"{key}.{k}", f"unknown option; valid: {', '.join(sorted(allowed))}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ConfigError(f"{key}.{k}", f"expected a positive number, got {v!r}")
    if options.get("load_factor", 1.25) < 1:
        raise ConfigError(f"{key}.load_factor", "must be at least 1")


class ConsistentHashPolicy(Policy):
    name = "consistent_hash"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ring = HashRing(int(self.options.get("vnodes", 64)))
        self.load_factor = float(self.options.get("load_factor", 1.25))

    @classmethod
    def validate_options(cls, options: Mapping[str, Any], key: str) -> None:
        validate_ring_options(options, key)

    def on_workers_changed(self, workers: Sequence[Worker]) -> None:
        super().on_workers_changed(workers)
        self.ring.forget(w.url for w in workers)

    def select(self, workers: Sequence[Worker], ctx: RequestContext) -> Worker | None:
        if not workers:
            return None
        key = route_key(ctx)
        if key is None:
            return pick_random_min(workers, [w.in_flight_tokens for w in workers], self.deps.rng)
        return self.ring.pick(key, workers, self.load_factor)
