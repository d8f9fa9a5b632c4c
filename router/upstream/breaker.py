"""A circuit breaker per worker: stop sending requests to a worker that keeps failing.

After ``failures`` consecutive failed calls (which failures count is ``router.retry.RULES``)
the breaker opens and the worker gets no traffic. After ``cooldown_s`` it is half-open: the
next request to the pool may go to it, as the one probe. The probe's success closes the
breaker, its failure opens it for another cooldown, and a probe that ends neither way (its
client left, a keep-alive race) lets the next request probe instead.

An open breaker is not an ejection (``upstream/health.py``): the worker is up as far as
its health check knows, so its prefix-index entries are kept for when it closes again.

Time is read from the injected ``now``; nothing here runs on a timer. The open -> half-open
step happens when the pool next looks (``poll``), so a breaker that nobody asks about stays
``open`` past its cooldown.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum, IntEnum

from kvroute.router.config import BreakerConfig


class State(IntEnum):
    """The values are what ``kvroute_worker_breaker_state`` reports."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Outcome(Enum):
    """What one upstream call says about its worker."""

    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"  # says nothing about the worker (the client left, a keep-alive race)


class Breaker:
    def __init__(self, cfg: BreakerConfig = BreakerConfig(), now: Callable[[], float] = time.monotonic):
        self.threshold = cfg.failures
        self.cooldown_s = cfg.cooldown_s
        self._now = now
        self.state = State.CLOSED
        self.failures = 0  # consecutive, while closed
        self.opened_at: float | None = None
        self.probing = False  # half-open: the probe is in flight
        self.on_change: Callable[[], None] | None = None  # the pool's hook: routable set or metric changed

    @property
    def admits(self) -> bool:
        """Whether the worker may be chosen now."""
        return self.state is State.CLOSED or (self.state is State.HALF_OPEN and not self.probing)

    @property
    def probe_at(self) -> float | None:
        """When an open breaker turns half-open."""
        return self.opened_at + self.cooldown_s if self.state is State.OPEN and self.opened_at is not None else None

    def poll(self) -> None:
        """Open -> half-open once the cooldown is over."""
        probe_at = self.probe_at
        if probe_at is not None and self._now() >= probe_at:
            self._set(State.HALF_OPEN)

    def on_dispatch(self) -> bool:
        """A request goes to the worker; True when it is the half-open probe. The pipeline
        chooses and dispatches without yielding to the loop, so only one request can."""
        if self.state is State.HALF_OPEN and not self.probing:
            self.probing = True
            self._changed()
            return True
        return False

    def record(self, outcome: Outcome, *, probe: bool = False) -> None:
        """The outcome of a call. Only the probe moves a half-open breaker; calls sent before
        the breaker opened, and ending after, change nothing."""
        if probe:
            self.probing = False
            if outcome is Outcome.SUCCESS:
                self._set(State.CLOSED)
            elif outcome is Outcome.FAILURE:
                self._open()
            else:
                self._changed()  # the next request probes
        elif self.state is State.CLOSED and outcome is not Outcome.IGNORED:
            if outcome is Outcome.SUCCESS:
                self.failures = 0
            else:
                self.failures += 1
                if self.failures >= self.threshold:
                    self._open()

    def _open(self) -> None:
        self.opened_at = self._now()
        self._set(State.OPEN)

    def _set(self, state: State) -> None:
        self.state = state
        self.failures = 0
        self.probing = False
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()
