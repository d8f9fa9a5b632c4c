"""The retry table (router/retry.py) against docs/reliability.md, its classification of every
upstream failure, backoff with jitter, the retry budget and each bound on a retry."""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

import pytest

from kvroute.router.config import BreakerConfig, RetriesConfig, TimeoutsConfig
from kvroute.router.errors import (
    BudgetExceeded,
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
from kvroute.router.retry import RULES, Again, Retrier, RetryBudget, classify, retry_after_s
from tests.clock import FakeClock

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


def status(code: int, retry_after: str | None = None) -> UpstreamStatusError:
    return UpstreamStatusError(code, b"{}", "application/json", retry_after)


def test_the_docs_print_the_same_table():
    text = DOC.read_text()
    table = text.split("<!-- retry-table -->")[1].split("<!-- /retry-table -->")[0]
    rows = [[c.strip().strip("`") for c in line.strip().strip("|").split("|")]
            for line in table.strip().splitlines() if line.startswith("| `")]
    documented = {r[0]: (r[2], r[3] == "yes", {"yes": True, "no": False}.get(r[4]), r[5]) for r in rows}
    in_code = {r.failure: (r.retry.value, r.waits_retry_after, r.budgeted if r.retry is not Again.NEVER else None,
                           r.breaker.value) for r in RULES.values()}
    assert documented == in_code


@pytest.mark.parametrize("exc, failure", [
    (UpstreamConnectError("refused"), "connect_failed"),
    (UpstreamConnectTimeout("slow"), "connect_timeout"),
    (UpstreamConnectionLost("reset"), "connection_lost"),
    (UpstreamFirstByteTimeout("stalled"), "stalled"),
    (UpstreamIdleTimeout("stalled after an event the client never saw"), "stalled"),
    (UpstreamTimeout("deadline"), "request_timeout"),
    (status(429), "http_429"),
    (status(503), "http_503"),
    (status(500), "http_500_502_504"),
    (status(502), "http_500_502_504"),
    (status(504), "http_500_502_504"),
    (status(501), "http_other_5xx"),
    (status(400), "http_other_4xx"),
    (status(404), "http_other_4xx"),
    (status(413), "http_other_4xx"),
    (UpstreamRedirect("moved"), "redirect"),
    (UpstreamError("bad response"), "bad_response"),
])
def test_every_upstream_failure_has_its_row(exc, failure):
    assert classify(exc).failure == failure
    assert classify(exc, client_started=True).failure == "after_first_byte"


def test_what_is_not_the_workers_doing_has_no_row():
    assert classify(BudgetExceeded("spent")) is None
    assert classify(ValueError("bug")) is None


def test_retry_after_reads_seconds_only():
    assert retry_after_s("2") == 2.0 and retry_after_s("0.5") == 0.5
    for bad in (None, "", "soon", "-1", "inf", "nan", "Wed, 21 Oct 2026 07:28:00 GMT"):
        assert retry_after_s(bad) is None


def test_backoff_is_exponential_with_full_jitter():
    clock = FakeClock()
    r = Retrier(RetriesConfig(backoff_base_s=0.1, backoff_max_s=0.5), clock, random.Random(7))
    for n, cap in ((0, 0.1), (1, 0.2), (2, 0.4), (3, 0.5), (40, 0.5)):
        delays = [r.backoff_s(n) for _ in range(200)]
        assert 0 <= min(delays) and max(delays) <= cap
        assert max(delays) > cap * 0.8  # spread over the range, not pinned to it


def test_the_budget_allows_a_share_of_recent_requests_plus_a_minimum():
    clock = FakeClock()
    budget = RetryBudget(ratio=0.1, min_per_s=0.2, now=clock.time)  # a reserve of 2 per 10 s
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]
    for _ in range(50):
        budget.on_request()
    assert [budget.try_spend() for _ in range(6)] == [True] * 5 + [False]  # 2 + 10% of 50 = 7
    clock.advance(10)  # the window moved on: old requests and retries are forgotten
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]


def test_the_budget_window_slides_bucket_by_bucket():
    clock = FakeClock()
    budget = RetryBudget(ratio=1.0, min_per_s=0, now=clock.time)
    budget.on_request()
    assert budget.try_spend() and not budget.try_spend()
    clock.advance(5)
    budget.on_request()
    assert budget.try_spend() and not budget.try_spend()  # 2 retries for 2 requests
    clock.advance(5.5)  # the first request and its retry left the window; the second's stay
    assert not budget.try_spend()
    budget.on_request()
    assert budget.try_spend() and not budget.try_spend()


def decide(r: Retrier, exc: BaseException, **kw):
    args = {"client_started": False, "tries": 1, "lost_before": False, "has_other": True, "remaining_s": 600.0}
    return r.decide(exc, **{**args, **kw})


def retrier(**cfg) -> Retrier:
    return Retrier(RetriesConfig(**cfg), FakeClock(), random.Random(0))


def test_decisions_follow_the_table():
    r = retrier()
    lost = UpstreamConnectionLost("reset")
    d = decide(r, lost)
    assert d.again and d.same_worker and d.delay_s == 0  # the same worker, at once
    d = decide(r, lost, tries=2, lost_before=True)
    assert d.again and not d.same_worker  # lost again: another worker
    d = decide(r, UpstreamConnectError("refused"))
    assert d.again and not d.same_worker and 0 <= d.delay_s <= 0.025
    for never in (status(400), status(501), UpstreamTimeout("spent"), UpstreamError("bad response")):
        d = decide(r, never)
        assert not d.again and d.refused is None  # the table says never: no refusal is counted
    d = decide(r, UpstreamConnectError("refused"), client_started=True)
    assert not d.again and d.rule is RULES["after_first_byte"] and RULES["after_first_byte"].retry is Again.NEVER


def test_retry_after_is_a_minimum_wait_when_short_and_ends_the_tries_when_long():
    r = retrier(retry_after_max_s=1.0)
    d = decide(r, status(503, "1"))
    assert d.again and d.delay_s == 1.0
    d = decide(r, status(429, "0"))
    assert d.again and d.delay_s <= 0.025
    d = decide(r, status(503, "30"))
    assert not d.again and d.refused == "retry_after"
    d = decide(r, status(500, "30"))  # only 429 and 503 are about load
    assert d.again and d.delay_s <= 0.025


@pytest.mark.parametrize("kw, cfg, reason", [
    ({"tries": 3}, {}, "attempts"),
    ({"tries": 1}, {"max_attempts": 1}, "attempts"),
    ({"has_other": False}, {}, "no_worker"),
    ({"remaining_s": 0.0}, {}, "deadline"),
    ({}, {"budget_ratio": 0.0, "min_retries_per_s": 0.0}, "budget"),
])
def test_each_bound_refuses_a_retry_and_names_itself(kw, cfg, reason):
    d = decide(retrier(**cfg), status(502), **kw)
    assert not d.again and d.refused == reason


@pytest.mark.parametrize("exc", [UpstreamConnectError("refused"), UpstreamConnectionLost("reset")])
def test_a_spent_budget_still_retries_off_a_worker_that_is_gone(exc):
    r = retrier(budget_ratio=0.0, min_retries_per_s=0.0)
    assert decide(r, exc).again
    assert decide(r, exc, lost_before=True).again  # the lost connection's second try: another worker
    assert decide(r, exc, tries=3).refused == "attempts"
    assert decide(r, exc, lost_before=True, has_other=False).refused == "no_worker"


def test_a_wait_longer_than_the_deadline_is_refused():
    d = decide(retrier(), status(503, "1"), remaining_s=0.5)
    assert not d.again and d.refused == "deadline"


@pytest.mark.parametrize("doc", ["reliability.md", "configuration.md"])
def test_the_docs_name_every_reliability_key(doc):
    text = (DOC.parent / doc).read_text()
    for cls in (TimeoutsConfig, RetriesConfig, BreakerConfig):
        for f in dataclasses.fields(cls):
            assert re.search(rf"`(\w+\.)?{f.name}`", text), f"{doc} does not name {f.name}"
