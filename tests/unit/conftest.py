from __future__ import annotations

import pytest

from kvroute.benchmarks.backends.mock import fake_worker


@pytest.fixture
async def upstream(aiohttp_server):
    """The fake worker (benchmarks/backends/mock.py); a test file may define its own."""
    return await aiohttp_server(fake_worker())
