"""Governance fixtures: a real redis-server for the session, the fake worker, and helpers
to build routers (create_app) and Governors with an injected clock."""

from __future__ import annotations

import uuid

import pytest

from kvroute.benchmarks.backends.mock import fake_worker
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from tests.clock import FakeClock

ADMIN = "admin-key-0"
KEY_A = "sk-tenant-a"
KEY_B = "sk-tenant-b"
TENANTS = [{"name": "acme", "keys": [KEY_A]}, {"name": "globex", "keys": [KEY_B]}]
# Redis timeouts for tests about concurrency and sharing, not faults: on a loaded test
# machine 50 requests in one event loop can keep a reply waiting past the 0.5 s default,
# which the router rightly reads as an outage.
PATIENT = {"connect_timeout_s": 5, "timeout_s": 5}


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def upstream(aiohttp_server):
    return await aiohttp_server(fake_worker())


def worker_url(server) -> str:
    return str(server.make_url("")).rstrip("/")


def router_cfg(workers: list[str], governance: dict, *, tiers: list[dict] | None = None,
               price: dict | None = None):
    model: dict = {"name": "tiny"}
    if tiers:
        model["tiers"] = [{**t, "workers": workers, "policy": "round_robin"} for t in tiers]
    else:
        model.update(workers=workers, policy="round_robin", price=price or {})
    return config_from_dict({"models": [model], "health": {"interval_s": 60}, "governance": governance})


async def make_client(aiohttp_client, upstream, governance: dict, clock: FakeClock, **kw):
    app = create_app(router_cfg([worker_url(upstream)], governance, **kw), clock=clock)
    return await aiohttp_client(app)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
