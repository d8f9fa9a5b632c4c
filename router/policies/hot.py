"""Hot prefixes for the ``prefix`` policy: recent traffic by prefix and by worker, and
when a prefix is copied to another worker.

One system prompt may carry a large part of the traffic. Pinned to one worker, it makes
that worker the fleet's bottleneck; copied everywhere, it is recomputed everywhere. Two
rules decide how many workers serve it:

- **Share** (proactive, over the last ``window`` requests): a prefix with
  ``HOT_FAIR_SHARES`` fair shares of the traffic or more (share x workers >= 1.5) is
  served by ``ceil(replicas x fair shares)`` workers, copied before any worker is
  overloaded.
- **Load** (reactive, over the last ``load_window`` requests, steadier counts): a prefix
  is copied when even its least-loaded holder served more than ``load_bound`` fair shares
  and most of that holder's requests were this prefix's. A prefix too small to be the
  cause (one of many groups) stays put, so noise in the counts does not copy it about.
  Only a request whose holders have no more of it than the prefix's recent requests
  share is moved, and only while those requests are mostly that shared part: chats and
  agents behind a shared prompt carry histories that a move would recompute.

A prefix copied by either rule keeps being spread over its holders while it stays in the
load window, also when its share dips under the mark again (one near the mark is copied
during a burst; left to the usual scoring afterwards, one holder took most of it).

A prefix being spread goes to its holder that served the fewest recent requests (for a
copied prefix, the fewest in the load window, so that a holder that also carries other
prefixes takes fewer of this one), or to the eligible worker that served the fewest
when a copy is due (for the load rule, only if it served fewer than the holder: a copy
must relieve, not move the load about).

Cost: O(1) per dispatch plus an O(log blocks) comparison of block keys; O(holders +
sample) per decision. Memory: the two windows, and per prefix in the long window the
block keys its requests share.
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from collections.abc import Sequence

from kvroute.router.policies.base import pick_random_min
from kvroute.router.upstream.workers import Worker

# A prefix is hot by share alone at this many workers' fair share of recent traffic. A
# lower mark copied agents' shared tool schemas about (each ~1.2 fair shares in the
# agent benchmark) at a cost of 2 points of hit rate in the simulator; shares below it
# are spread by the load rule, and only where a worker is overloaded.
HOT_FAIR_SHARES = 1.5


class Tally:
    """Route keys, workers and (key, worker) pairs of the last ``window`` requests."""

    def __init__(self, window: int):
        self.window = max(1, window)
        self.recent: deque[tuple[int | None, str]] = deque()  # (route key, worker)
        self.keys: Counter[int | None] = Counter()
        self.workers: Counter[str] = Counter()
        self.pairs: Counter[tuple[int | None, str]] = Counter()

    def add(self, key: int | None, url: str) -> tuple[int | None, str] | None:
        """Count a request; returns the one that left the window, if any."""
        self.recent.append((key, url))
        self.keys[key] += 1
        self.workers[url] += 1
        self.pairs[(key, url)] += 1
        if len(self.recent) <= self.window:
            return None
        old = self.recent.popleft()
        _drop(self.keys, old[0])
        _drop(self.workers, old[1])
        _drop(self.pairs, old)
        return old

    def fair(self, n: int) -> float:
        """Requests per worker in a fair split of the window.

        Over the requests seen so far while the window fills (but at least a quarter of
        it): measured over the whole window, a hot prefix had to send 1.5 windows' fair
        share to one worker before it counted as hot (24 requests in a row on 4 workers).
        """
        return max(len(self.recent), self.window // 4) / n


def _drop(counter: Counter, item: object, amount: int = 1) -> None:
    counter[item] -= amount
    if not counter[item]:
        del counter[item]


class HotPrefixes:
    """Recent traffic by prefix and by worker, and the spreading rule."""

    def __init__(self, window: int, replicas: float, load_bound: float, load_window: int):
        self.replicas = replicas
        self.load_bound = load_bound  # 0: the load rule is off
        self.short = Tally(window)  # shares, and which holder served the fewest
        self.long = Tally(load_window)  # load: steadier counts, so noise does not copy
        self._spread: set[int] = set()  # copied; spread while in the long window
        # per prefix, the block keys its requests in the long window have in common: a
        # holder that has more of a prompt than that has its history (a chat's, an agent's)
        self._shared: dict[int | None, tuple[int, ...]] = {}
        self._blocks: Counter[int | None] = Counter()  # per prefix, its requests' blocks
        self._lengths: deque[int] = deque()  # blocks of each request in the long window

    def record(self, key: int | None, url: str, block_keys: tuple[int, ...]) -> None:
        """A request with route ``key`` and these block keys was sent to ``url``."""
        self.short.add(key, url)
        old = self.long.add(key, url)
        self._blocks[key] += len(block_keys)
        self._lengths.append(len(block_keys))
        if old is not None:
            _drop(self._blocks, old[0], self._lengths.popleft())
        shared = self._shared.get(key)
        if shared is None:
            self._shared[key] = block_keys
        elif (d := common_blocks(shared, block_keys)) < len(shared):
            self._shared[key] = shared[:d]
        if old is not None and old[0] not in self.long.keys:
            self._spread.discard(old[0])
            self._shared.pop(old[0], None)

    def shared_blocks(self, key: int | None) -> int:
        """How many leading blocks the prefix's recent requests have in common."""
        return len(self._shared.get(key, ()))

    def mostly_shared(self, key: int | None) -> bool:
        """Whether the prefix's recent requests are mostly their shared part (a system
        prompt and a question), not histories that grow past it (chats, agents)."""
        count = self.long.keys[key]
        return count > 0 and 4 * self.shared_blocks(key) * count >= 3 * self._blocks[key]

    def fair_shares(self, key: int | None, n: int) -> float:
        """How many workers' fair share of recent traffic this prefix carries."""
        count = self.short.keys[key]
        if count < 2:  # one request says nothing of a share (in a large fleet it would be hot)
            return 0.0
        return count / self.short.fair(n)

    def load(self, url: str, n: int) -> float:
        """``url``'s recent requests in fair shares (1.0: exactly its share)."""
        return self.long.workers[url] / self.long.fair(n)

    def is_hot(self, key: int | None, n: int) -> bool:
        """Hot by share, or being spread for load."""
        return key is not None and (key in self._spread or self.fair_shares(key, n) >= HOT_FAIR_SHARES)

    def choose(self, key: int | None, n: int, holders: Sequence[Worker], others: Sequence[Worker],
               depth: int, rng: random.Random) -> Worker | None:
        """For a prefix to spread: its least-used holder, or a new copy where one is due.
        ``depth``: the blocks of the prompt each holder has. None: not hot, let the caller
        score it as usual."""
        if key is None or not holders:
            return None
        used = self.short.workers
        shares = self.fair_shares(key, n)
        if shares >= HOT_FAIR_SHARES and others and len(holders) < math.ceil(shares * self.replicas):
            self._spread.add(key)
            return pick_random_min(others, [used[w.url] for w in others], rng)
        # only a request whose holders have no more of it than the prefix's requests share
        # is moved for load: an agent behind a shared schema moved off its history
        # recomputes it all (agent tight in the simulator: 0.772 -> 0.727 when they were)
        movable = depth <= self.shared_blocks(key) and self.mostly_shared(key)
        if others and movable and self._overloads(key, holders, n):
            load = self.long.workers
            target = pick_random_min(others, [load[w.url] for w in others], rng)
            if load[target.url] < min(load[w.url] for w in holders):  # relieve, not move load about
                self._spread.add(key)
                return target
        if key in self._spread:
            # copied: even out the holders' load in the load window, so a holder that also
            # carries other prefixes takes fewer of this one
            counts = self.long.workers
        elif shares >= HOT_FAIR_SHARES:
            counts = used
        else:
            return None
        return pick_random_min(holders, [counts[w.url] for w in holders], rng)

    def _overloads(self, key: int, holders: Sequence[Worker], n: int) -> bool:
        """Whether even the least-loaded holder is over the load bound, and because of this
        prefix: it sent that holder most of its recent requests."""
        if self.load_bound <= 0:
            return False
        load = self.long.workers
        least = min(load[w.url] for w in holders)
        if least <= self.load_bound * self.long.fair(n):
            return False
        # on that holder (one of them, if several are tied); one request says nothing of a
        # load (in a fleet larger than the window, one is over)
        return any(max(2, least / 2) < self.long.pairs[(key, w.url)]
                   for w in holders if load[w.url] == least)


def common_blocks(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Leading blocks ``a`` and ``b`` share. Chain keys cover every block before them, so
    equal keys at a position mean equal prefixes up to it: a binary search, O(log n)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo
