"""``kvroute_router_added_seconds``: a request's time in kvroute itself, not the worker's.

Mock workers (benchmarks/backends/mock.py) make the worker's share known: a worker that
waits before its first event adds that wait to the request's time to first token, and
nothing to the router's own time. tests/integration/test_router_fleet.py checks the same on
vLLM.
"""

from __future__ import annotations

import time

import pytest

from kvroute.benchmarks.backends.mock import FAULTS, fake_worker
from kvroute.benchmarks.backends.urls import histogram_quantile, parse_router_state
from kvroute.router import keys, proxy
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from tests.clock import FakeClock
from tests.unit.test_cascade import FixedScorer

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
STALL_S = 0.3
SLOW_S = 0.05


def url_of(server) -> str:
    return str(server.make_url("")).rstrip("/")


def sample(client, name: str, **labels) -> float:
    return client.server.app[keys.METRICS].registry.get_sample_value(name, labels) or 0.0


async def router(aiohttp_client, workers, **model):
    cfg = config_from_dict({"models": [{"name": "tiny", "workers": [url_of(w) for w in workers],
                                        "policy": "round_robin", **model}],
                            "health": {"interval_s": 60}})
    return await aiohttp_client(create_app(cfg, clock=FakeClock()))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_the_workers_wait_is_in_the_ttft_and_not_in_the_routers_time(aiohttp_client, aiohttp_server, stream):
    worker = await aiohttp_server(fake_worker("a"))
    worker.app[FAULTS].update({"stall_first_event_s": STALL_S} if stream else {"stall_s": STALL_S})
    client = await router(aiohttp_client, [worker])
    for _ in range(3):
        resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert resp.status == 200
        await resp.read()
    count = sample(client, "kvroute_router_added_seconds_count", model="tiny")
    added = sample(client, "kvroute_router_added_seconds_sum", model="tiny")
    ttft = sample(client, "kvroute_ttft_seconds_sum", model="tiny", worker=url_of(worker))
    assert count == 3
    assert 0 < added < 3 * STALL_S / 2  # the stalls are the worker's, not the router's
    assert ttft >= 3 * STALL_S


async def test_a_retried_request_is_left_out_and_a_refused_one_too(aiohttp_client, aiohttp_server):
    """First tries only: a retry's time before its call includes the failed try's."""
    failing, good = sorted([await aiohttp_server(fake_worker(n)) for n in ("a", "b")], key=url_of)
    failing.app[FAULTS].update({"status": 503})
    client = await router(aiohttp_client, [failing, good])
    resp = await client.post("/v1/chat/completions", json=CHAT)  # round robin: the failing one first
    assert resp.status == 200 and resp.headers["x-kvroute-worker"] == url_of(good)
    assert sample(client, "kvroute_retries_total", model="tiny") == 1
    assert sample(client, "kvroute_router_added_seconds_count", model="tiny") == 0
    failing.app[FAULTS].clear()
    resp = await client.post("/v1/chat/completions", json=CHAT)  # answered on its first try
    assert resp.status == 200 and sample(client, "kvroute_retries_total", model="tiny") == 1
    assert sample(client, "kvroute_router_added_seconds_count", model="tiny") == 1
    bad = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": "nope"})
    assert bad.status == 400
    assert sample(client, "kvroute_router_added_seconds_count", model="tiny") == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_what_runs_after_a_whole_answer_is_read_counts_until_it_is_written(aiohttp_client, aiohttp_server,
                                                                                  monkeypatch, stream):
    """Accounting, telemetry and the response cache run after the worker's whole answer is
    read and before the server writes it: kvroute's time. A stream's first event is out
    before its accounting, which then adds nothing to its time to first token."""
    worker = await aiohttp_server(fake_worker("a"))
    client = await router(aiohttp_client, [worker])
    account = proxy.account

    def slow_account(app, d) -> None:
        time.sleep(SLOW_S)  # e.g. a slow hook on the event loop
        account(app, d)

    monkeypatch.setattr(proxy, "account", slow_account)
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert resp.status == 200
    await resp.read()
    assert sample(client, "kvroute_router_added_seconds_count", model="tiny") == 1
    added = sample(client, "kvroute_router_added_seconds_sum", model="tiny")
    assert added < SLOW_S if stream else added >= SLOW_S


async def test_an_escalated_cascade_is_left_out_and_a_kept_answer_counted(aiohttp_client, aiohttp_server):
    small, large = [await aiohttp_server(fake_worker(n)) for n in ("small", "large")]
    cfg = config_from_dict({"models": [{"name": "auto", "mode": "cascade",
                                        "cascade": {"threshold": 0.5, "answer_model": "rules"},
                                        "tiers": [{"name": "small", "workers": [url_of(small)]},
                                                  {"name": "large", "workers": [url_of(large)]}]}],
                            "health": {"interval_s": 60}})
    app = create_app(cfg, clock=FakeClock())
    judge = app[keys.ROUTES].get("auto").judge
    client = await aiohttp_client(app)
    body = {**CHAT, "model": "auto"}
    judge.scorer = FixedScorer(0.2)  # escalates: the client's answer is the second try's
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200 and resp.headers["x-kvroute-escalated"] == "true"
    assert sample(client, "kvroute_router_added_seconds_count", model="auto") == 0
    judge.scorer = FixedScorer(0.9)  # kept: the first try's answer, judged in kvroute
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200 and resp.headers["x-kvroute-escalated"] == "false"
    assert sample(client, "kvroute_router_added_seconds_count", model="auto") == 1


def test_histogram_quantile_interpolates_within_the_bucket() -> None:
    buckets = {0.001: 2.0, 0.002: 6.0, 0.005: 8.0, float("inf"): 8.0}
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.001 + 0.001 * (4 - 2) / 4)
    assert histogram_quantile(buckets, 0.25) == pytest.approx(0.001)
    assert histogram_quantile({0.001: 0.0, float("inf"): 0.0}, 0.5) is None
    assert histogram_quantile({0.001: 0.0, float("inf"): 4.0}, 0.5) == 0.001  # past the last bound


def test_router_state_reads_the_routers_own_time() -> None:
    metrics = (
        "# TYPE kvroute_router_added_seconds histogram\n"
        'kvroute_router_added_seconds_bucket{le="0.001",model="tiny"} 1.0\n'
        'kvroute_router_added_seconds_bucket{le="0.002",model="tiny"} 3.0\n'
        'kvroute_router_added_seconds_bucket{le="+Inf",model="tiny"} 3.0\n'
        'kvroute_router_added_seconds_count{model="tiny"} 3.0\n'
        'kvroute_router_added_seconds_sum{model="tiny"} 0.004\n'
    )
    state = parse_router_state({"models": {"tiny": {"mode": "exact"}}}, metrics)
    assert state["added_ms_p50"] == pytest.approx(1.25)
