"""Time in tests: clocks they move by hand, and a bounded wait for what no clock decides.

* ``FakeClock``: for code that reads ``router.governance.clock.Clock``; ``sleep`` returns
  at once, moving the clock forward (a throttle or retry delay costs no real time).
* ``ManualClock``: for loops on a timer (intervals, backoff, resyncs); ``sleep`` waits
  until the test moves the clock past its end, so the test decides when each round runs.
* ``SkewedMonotonic``: ``time.monotonic()`` plus the seconds a test skips ahead, for code
  that must run in real time (a soak) but whose TTLs the test wants expired at once.
* ``until``: poll a condition that another task or the network makes true, with a deadline.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

from kvroute.router.governance.clock import Clock


class FakeClock(Clock):
    """A clock tests move by hand; ``sleep`` advances it at once and records the delay."""

    def __init__(self, start: float = 1_800_000_000.0):
        self.now = start
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class ManualClock(FakeClock):
    """A clock whose ``sleep`` returns only once the test has advanced it past the sleep's end.

    ``await clock.fire()`` waits until the code under test is sleeping on the clock, then
    advances to the earliest wake-up: one round of its timer loop, no real time spent.
    """

    def __init__(self, start: float = 1_800_000_000.0):
        super().__init__(start)
        self._timers: list[tuple[float, float, asyncio.Future[None]]] = []  # (end, seconds, waiter)
        self._sleeping: asyncio.Event | None = None

    @property
    def pending(self) -> list[float]:
        """When each sleep in progress ends, earliest first."""
        return sorted(end for end, _, _ in self._timers)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        timer = (self.now + seconds, seconds, asyncio.get_running_loop().create_future())
        self._timers.append(timer)
        if self._sleeping is not None:
            self._sleeping.set()
        try:
            await timer[2]
        finally:
            if timer in self._timers:  # cancelled before it was due
                self._timers.remove(timer)

    def advance(self, seconds: float) -> None:
        self._move_to(self.now + seconds)

    def _move_to(self, when: float) -> None:
        self.now = max(self.now, when)
        for timer in [t for t in self._timers if t[0] <= self.now]:
            self._timers.remove(timer)
            if not timer[2].done():
                timer[2].set_result(None)

    async def sleeping(self, timeout: float = 5.0) -> None:
        """Wait (real time, bounded) until something sleeps on this clock."""
        if self._sleeping is None:
            self._sleeping = asyncio.Event()

        async def wait(event: asyncio.Event) -> None:
            while not self._timers:
                event.clear()
                await event.wait()

        await asyncio.wait_for(wait(self._sleeping), timeout)

    async def fire(self, timeout: float = 5.0) -> float:
        """Wait until something sleeps on the clock, then advance to its end; return its delay."""
        await self.sleeping(timeout)
        end, seconds, _ = min(self._timers, key=lambda t: t[0])
        self._move_to(end)
        return seconds


class SkewedMonotonic:
    """``time.monotonic()`` plus what ``advance`` skipped: real time that tests can jump ahead."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.skipped

    def advance(self, seconds: float) -> None:
        self.skipped += seconds


async def until(condition: Callable[[], object] | Callable[[], Awaitable[object]], timeout: float = 5.0,
                poll_s: float = 0.005) -> None:
    """Wait until ``condition()`` (sync or async) is true; fail after ``timeout`` seconds.

    For progress that another task, a server or the network makes (a watch opening, a
    probe answered, a client's departure noticed), never for a timer: move a clock instead.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() >= deadline:
            raise AssertionError(f"condition not reached within {timeout}s")
        await asyncio.sleep(poll_s)
