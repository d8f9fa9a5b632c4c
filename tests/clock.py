"""A clock tests move by hand, for the code that reads ``router.governance.clock.Clock``."""

from __future__ import annotations

import asyncio

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
