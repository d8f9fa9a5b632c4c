"""The clock governance reads: wall time for windows and TTLs, and a sleep for throttling.

Injected everywhere time matters, so tests move time forward instead of sleeping.
"""

from __future__ import annotations

import asyncio
import time


class Clock:
    """Real time."""

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


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
