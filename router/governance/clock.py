"""The clock governance reads: wall time for windows and TTLs, and a sleep for throttling.

Injected everywhere time matters, so tests move time forward instead of sleeping
(``tests/clock.py``).
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

