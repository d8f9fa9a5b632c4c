"""Circuit breakers per worker, on an injected clock: closed -> open -> half-open -> closed
(or open again), the pool's routable set following them, and the prefix index untouched."""

from __future__ import annotations

from kvroute.router.config import BreakerConfig, config_from_dict
from kvroute.router.metrics import RouterMetrics
from kvroute.router.prefix import chain_keys
from kvroute.router.routes import ModelRoutes
from kvroute.router.upstream.breaker import Breaker, Outcome, State
from kvroute.router.upstream.workers import WorkerPool
from tests.clock import FakeClock

FAIL, OK, IGNORED = Outcome.FAILURE, Outcome.SUCCESS, Outcome.IGNORED


def pool(clock: FakeClock, failures: int = 3, cooldown_s: float = 10.0) -> WorkerPool:
    return WorkerPool("m", ["http://a", "http://b"], breaker=BreakerConfig(failures, cooldown_s), now=clock.time)


def urls(p: WorkerPool) -> list[str]:
    return [w.url for w in p.healthy()]


def test_consecutive_failures_open_it_and_a_success_in_between_resets_the_count():
    b = Breaker(BreakerConfig(3, 10), now=FakeClock().time)
    b.record(FAIL)
    b.record(FAIL)
    b.record(OK)
    b.record(FAIL)
    b.record(FAIL)
    assert b.state is State.CLOSED and b.admits
    b.record(IGNORED)  # a client that left says nothing about the worker
    assert b.state is State.CLOSED
    b.record(FAIL)
    assert b.state is State.OPEN and not b.admits


def test_open_half_open_closed_and_open_again_with_the_pool_following():
    clock = FakeClock()
    p = pool(clock)
    a = p.get("http://a")
    changes: list[State] = []
    p.on_breaker_change(lambda w: changes.append(w.breaker.state))
    for _ in range(3):
        a.breaker.record(FAIL)
    assert a.breaker.state is State.OPEN and urls(p) == ["http://b"]
    assert a.healthy  # open is not ejected: the health check's view is unchanged

    clock.advance(9.9)
    assert urls(p) == ["http://b"]  # still cooling down
    clock.advance(0.1)
    assert urls(p) == ["http://a", "http://b"]  # half-open: one probe may go
    assert a.breaker.state is State.HALF_OPEN

    probe = a.breaker.on_dispatch()
    assert probe and urls(p) == ["http://b"]  # only one probe at a time
    assert not p.get("http://b").breaker.on_dispatch()  # a closed breaker's calls are no probes
    a.breaker.record(FAIL, probe=True)  # the probe failed: open for another cooldown
    assert a.breaker.state is State.OPEN and urls(p) == ["http://b"]
    clock.advance(5)
    assert urls(p) == ["http://b"]
    clock.advance(5)
    assert urls(p) == ["http://a", "http://b"]

    probe = a.breaker.on_dispatch()
    a.breaker.record(OK, probe=probe)
    assert a.breaker.state is State.CLOSED and a.breaker.failures == 0
    assert urls(p) == ["http://a", "http://b"]
    assert changes == [State.OPEN, State.HALF_OPEN, State.HALF_OPEN, State.OPEN, State.HALF_OPEN,
                       State.HALF_OPEN, State.CLOSED]


def test_a_probe_that_says_nothing_lets_the_next_request_probe():
    clock = FakeClock()
    b = Breaker(BreakerConfig(1, 1), now=clock.time)
    b.record(FAIL)
    clock.advance(1)
    b.poll()
    assert b.on_dispatch() and not b.admits
    b.record(IGNORED, probe=True)  # e.g. the client left before the answer began
    assert b.state is State.HALF_OPEN and b.admits


def test_calls_sent_before_it_opened_do_not_move_it():
    clock = FakeClock()
    b = Breaker(BreakerConfig(1, 1), now=clock.time)
    b.record(FAIL)
    b.record(OK)  # an older request, still in flight when the breaker opened, succeeds late
    assert b.state is State.OPEN
    clock.advance(1)
    b.poll()
    assert b.on_dispatch()
    b.record(OK)  # not the probe
    assert b.state is State.HALF_OPEN and not b.admits


def test_the_healthy_tuple_stays_cached_while_nothing_changes():
    clock = FakeClock()
    p = pool(clock, failures=1)
    first = p.healthy()
    assert p.healthy() is first
    p.get("http://a").breaker.record(FAIL)
    opened = p.healthy()
    assert opened is not first and p.healthy() is opened
    clock.advance(1)
    assert p.healthy() is opened  # the cooldown is not over: the same tuple
    p.get("http://b").healthy = False  # ejection still counts too
    assert urls(p) == []


def test_a_worker_that_left_no_longer_touches_its_old_pool():
    clock = FakeClock()
    p = pool(clock, failures=1)
    gone = p.get("http://b")
    p.set_members([("http://a", None)])
    before = p.healthy()
    gone.breaker.record(FAIL)
    assert p.healthy() is before


def test_an_open_breaker_keeps_the_index_and_reports_its_state():
    clock = FakeClock()
    metrics = RouterMetrics()
    cfg = config_from_dict({"models": [{"name": "m", "workers": ["http://a:1", "http://b:1"]}],
                            "breaker": {"failures": 2, "cooldown_s": 30}})
    route = ModelRoutes(cfg, metrics=metrics, clock=clock).get("m").tiers[0]
    a = route.pool.get("http://a:1")
    route.index.insert(a.url, chain_keys(list(range(64)), 16))
    blocks = route.index.blocks_of(a.url)

    def state() -> float | None:
        return metrics.registry.get_sample_value("kvroute_worker_breaker_state", {"model": "m", "worker": a.url})

    assert blocks > 0 and state() == 0
    a.breaker.record(FAIL)
    a.breaker.record(FAIL)
    assert state() == 2 and [w.url for w in route.pool.healthy()] == ["http://b:1"]
    assert route.index.blocks_of(a.url) == blocks  # not an ejection: the cache entries stay
    clock.advance(30)
    route.pool.healthy()
    assert state() == 1
    a.breaker.record(OK, probe=a.breaker.on_dispatch())
    assert state() == 0 and route.index.blocks_of(a.url) == blocks
