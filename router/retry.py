"""Which failed upstream calls are tried again, where, and how often.

``RULES`` is the one table: for each way an upstream call can fail, whether the request is
retried (on the same worker, on another, or never) and what the failure says about the
worker to its circuit breaker (``upstream/breaker.py``). docs/reliability.md prints the
same table, and a test keeps the two equal.

Nothing is retried once a byte has reached the client. A retry the table allows is still
refused when the request has had ``max_attempts`` tries, when no other worker is left,
when the wait (backoff, or the worker's ``Retry-After``) would outlast
``server.request_timeout_s``, or, for a worker that answered badly or too slowly, when the
pool's retry budget is spent. The budget is Finagle's (and Envoy's ``retry_budget``): over
the last ten seconds retries may add ``budget_ratio`` of the pool's requests plus
``min_retries_per_s`` a second, so when a whole pool fails, retries cannot multiply its
load. A worker that is gone (refused, or dropped the connection) is not charged: when one
dies it loses its whole batch at once, and the budget would turn one crash into lost
requests; those retries go to the live workers, bounded by ``max_attempts``.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from kvroute.router.config import RetriesConfig
from kvroute.router.errors import (
    UpstreamConnectError,
    UpstreamConnectionLost,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamFirstByteTimeout,
    UpstreamIdleTimeout,
    UpstreamRedirect,
    UpstreamStatusError,
    UpstreamTimeout,
)
from kvroute.router.upstream.breaker import Outcome


class Again(Enum):
    SAME_WORKER = "same worker, once"
    OTHER_WORKER = "another worker"
    NEVER = "never"


@dataclass(frozen=True)
class Rule:
    failure: str  # the row's name, as docs/reliability.md and the logs say it
    retry: Again
    breaker: Outcome  # what the failure tells the worker's breaker
    waits_retry_after: bool = False  # a short Retry-After is the least wait before the retry
    budgeted: bool = True  # the retry spends the pool's retry budget


SAME, OTHER, NEVER = Again.SAME_WORKER, Again.OTHER_WORKER, Again.NEVER
FAILURE, SUCCESS, IGNORED = Outcome.FAILURE, Outcome.SUCCESS, Outcome.IGNORED

RULES: dict[str, Rule] = {r.failure: r for r in (
    # Before the first byte reached the client:
    Rule("connect_failed", OTHER, FAILURE, budgeted=False),  # refused, unreachable: also ejected (health.py)
    Rule("connect_timeout", OTHER, FAILURE),  # no connection within timeouts.connect_s
    # A keep-alive connection the worker closed as we reused it: the worker is up and holds
    # the prompt's cache, so the same worker once; losing it again goes to another worker.
    Rule("connection_lost", SAME, IGNORED, budgeted=False),
    Rule("stalled", OTHER, FAILURE),  # timeouts.first_byte_s (or idle_s before a byte was relayed)
    Rule("http_429", OTHER, SUCCESS, waits_retry_after=True),  # busy, but answering: not broken
    Rule("http_503", OTHER, FAILURE, waits_retry_after=True),
    Rule("http_500_502_504", OTHER, FAILURE),
    Rule("http_other_5xx", NEVER, FAILURE),  # e.g. 501: the same on every worker
    Rule("http_other_4xx", NEVER, SUCCESS),  # the request's fault; the worker answered
    Rule("redirect", OTHER, FAILURE),  # a 3xx: this worker's URL is wrong, not the request
    Rule("bad_response", NEVER, IGNORED),  # not JSON, no event, or an SSE event over MAX_EVENT_BYTES
    Rule("request_timeout", NEVER, FAILURE),  # server.request_timeout_s spent: no time left
    # After the first byte: the stream ends with an SSE error event, never retried.
    Rule("after_first_byte", NEVER, FAILURE),  # lost, stalled (idle_s) or malformed mid-stream
)}


def classify(exc: BaseException, *, client_started: bool = False) -> Rule | None:
    """The row for an upstream call that failed with ``exc``; None: not the worker's doing
    (a budget, the kill switch, the client leaving), neither retried nor held against it."""
    if not isinstance(exc, UpstreamError):
        return None
    if client_started:
        return RULES["after_first_byte"]
    if isinstance(exc, UpstreamConnectionLost):
        return RULES["connection_lost"]
    if isinstance(exc, UpstreamConnectError):
        return RULES["connect_failed"]
    if isinstance(exc, UpstreamConnectTimeout):
        return RULES["connect_timeout"]
    if isinstance(exc, (UpstreamFirstByteTimeout, UpstreamIdleTimeout)):
        return RULES["stalled"]
    if isinstance(exc, UpstreamTimeout):
        return RULES["request_timeout"]
    if isinstance(exc, UpstreamRedirect):
        return RULES["redirect"]
    if isinstance(exc, UpstreamStatusError):
        if exc.status in (429, 503):
            return RULES[f"http_{exc.status}"]
        if exc.status in (500, 502, 504):
            return RULES["http_500_502_504"]
        return RULES["http_other_5xx" if exc.status >= 500 else "http_other_4xx"]
    return RULES["bad_response"]


def retry_after_s(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds; an HTTP date (or anything else) reads as absent."""
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class Clock(Protocol):
    """What retries and breakers read time from (``governance.clock.Clock`` and the tests'
    ``FakeClock`` are ones)."""

    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """Real time that never steps back: cooldowns and budget windows survive NTP."""

    def time(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _Window:
    """Events counted over the last ``span_s`` seconds, in ``buckets`` slices."""

    def __init__(self, now: Callable[[], float], span_s: float, buckets: int):
        self._now = now
        self._width = span_s / buckets
        self._counts = [0] * buckets
        self._at = int(now() / self._width)

    def _advance(self) -> int:
        at = int(self._now() / self._width)
        if at > self._at:
            n = len(self._counts)
            for i in range(max(self._at + 1, at - n + 1), at + 1):
                self._counts[i % n] = 0
            self._at = at
        return self._at % len(self._counts)

    def add(self) -> None:
        self._counts[self._advance()] += 1

    def total(self) -> int:
        self._advance()
        return sum(self._counts)


class RetryBudget:
    """Retries may be at most ``ratio`` of the requests of the last ``WINDOW_S`` seconds,
    plus ``min_per_s`` a second (Finagle's ``RetryBudget``)."""

    WINDOW_S = 10.0

    def __init__(self, ratio: float, min_per_s: float, now: Callable[[], float]):
        self.ratio = ratio
        self.reserve = min_per_s * self.WINDOW_S
        self._requests = _Window(now, self.WINDOW_S, 10)
        self._retries = _Window(now, self.WINDOW_S, 10)

    def on_request(self) -> None:
        self._requests.add()

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        if self._retries.total() + 1 > self.ratio * self._requests.total() + self.reserve:
            return False
        self._retries.add()
        return True


@dataclass(frozen=True)
class Decision:
    rule: Rule | None
    again: bool = False
    same_worker: bool = False
    delay_s: float = 0.0
    # the table allowed a retry but a bound refused it: attempts, no_worker, retry_after,
    # deadline or budget (the reason label of kvroute_retries_refused_total)
    refused: str | None = None


class Retrier:
    """One pool's retries: the table, backoff with jitter, and the pool's retry budget."""

    def __init__(self, cfg: RetriesConfig, clock: Clock, rng: random.Random | None = None):
        self.cfg = cfg
        self.clock = clock
        self.rng = rng or random.Random()
        self.budget = RetryBudget(cfg.budget_ratio, cfg.min_retries_per_s, clock.time)

    def on_request(self) -> None:
        """A request (not a retry) came to the pool: the budget grows with traffic."""
        self.budget.on_request()

    def backoff_s(self, retry: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**retry)], so retries that failed
        together do not come back together."""
        cap = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** min(retry, 32))
        return self.rng.uniform(0, cap)

    def decide(self, exc: BaseException, *, client_started: bool, tries: int, lost_before: bool,
               has_other: bool, remaining_s: float) -> Decision:
        """After try number ``tries`` failed with ``exc``: again, where, after how long.
        ``lost_before``: the same-worker retry was used; ``has_other``: an untried worker
        is routable; ``remaining_s``: until server.request_timeout_s is spent."""
        rule = classify(exc, client_started=client_started)
        if rule is None or rule.retry is NEVER:
            return Decision(rule)
        same = rule.retry is SAME and not lost_before
        if tries >= self.cfg.max_attempts:
            return Decision(rule, refused="attempts")
        if not same and not has_other:
            return Decision(rule, refused="no_worker")
        delay = 0.0 if same else self.backoff_s(tries - 1)
        if rule.waits_retry_after:
            wait = retry_after_s(getattr(exc, "retry_after", None))
            if wait is not None:
                if wait > self.cfg.retry_after_max_s:  # the worker asks for longer than we hold a request
                    return Decision(rule, refused="retry_after")
                delay = max(delay, wait)
        if delay >= remaining_s:
            return Decision(rule, refused="deadline")
        if rule.budgeted and not self.budget.try_spend():
            return Decision(rule, refused="budget")
        return Decision(rule, again=True, same_worker=same, delay_s=delay)
