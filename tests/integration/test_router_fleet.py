"""The router in front of a real vLLM fleet, driven by the real ``openai`` client."""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Iterator

import openai
import pytest

from kvroute.router.local.fleet import kill_worker
from tests.integration.conftest import BLOCK_SIZE, KV_BLOCKS, Router, record_result, scrape_fleet
from tests.integration.workload import shared_prefix_requests, system_prompt

pytestmark = pytest.mark.integration


@pytest.fixture
def client() -> Iterator[Callable[[Router], openai.OpenAI]]:
    """``client(router)``: an openai client of the router, closed after the test (a dropped
    client's sockets warn later, in another test or at the session's end)."""
    opened: list[openai.OpenAI] = []

    def make(router: Router) -> openai.OpenAI:
        opened.append(openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=60))
        return opened[-1]

    yield make
    for c in opened:
        c.close()


def test_openai_client_chat_and_completions_streaming_and_not(router_for, client):
    router = router_for("prefix")
    c = client(router)
    messages = [{"role": "user", "content": "Say something."}]

    raw = c.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=5,
                                                      extra_headers={"X-Request-Id": "job-42"})
    chat = raw.parse()
    assert raw.headers["x-kvroute-worker"].startswith("http://127.0.0.1:")
    assert chat._request_id == "job-42" and chat.id == "chatcmpl-job-42"  # vLLM named its request after it
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 5 and chat.usage.prompt_tokens > 0

    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=5, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[-1].choices[0].finish_reason == "length" and text
    assert all(ch.usage is None for ch in chunks)  # the usage chunk was stripped

    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5

    comp = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=4)
    assert comp.choices[0].text and comp.usage.completion_tokens == 4
    stream = list(c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=4, stream=True))
    assert "".join(s.choices[0].text for s in stream if s.choices)

    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert c.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.models.retrieve("nope")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="nope", messages=messages, max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=[{"role": "user"}], max_tokens=-3)


def test_requests_sharing_a_long_system_prompt_land_on_the_same_worker(router_for, client):
    router = router_for("prefix")
    c = client(router)
    system = system_prompt(random.Random(), 500)
    workers = set()
    for q in range(6):
        raw = c.chat.completions.with_raw_response.create(
            model="tiny", max_tokens=2,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": f"q{q}"}])
        workers.add(raw.headers["x-kvroute-worker"])
    assert len(workers) == 1


def run_workload(c: openai.OpenAI, router, seed: int) -> tuple[float, dict[str, int]]:
    """Shared-prefix workload through ``router`` with its client ``c``; vLLM's own
    prefix-cache hit rate."""
    before = scrape_fleet_for(router)
    for _group, messages in shared_prefix_requests(seed, groups=8, questions=6, words=400):
        c.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    after = scrape_fleet_for(router)
    hits = sum(after[u].prefix_hits - before[u].prefix_hits for u in after)
    queries = sum(after[u].prefix_queries - before[u].prefix_queries for u in after)
    prompts = {u: int(after[u].prompt_tokens - before[u].prompt_tokens) for u in after}
    return hits / queries, prompts


def scrape_fleet_for(router):
    return scrape_fleet(router.fleet)


def test_prefix_policy_beats_round_robin_hit_rate_with_capped_kv(router_for, fleet, client):
    rates = {}
    for policy in ("round_robin", "prefix"):
        router = router_for(policy)
        router.fleet = fleet
        rates[policy], _ = run_workload(client(router), router, seed=random.randrange(1 << 30))
    print(f"\nvLLM prefix-cache hit rate, 8 groups x 6 questions, {KV_BLOCKS} blocks x {BLOCK_SIZE} "
          f"tokens per worker: {rates}")
    record_result("hit_rate_prefix_vs_round_robin", {
        "workload": "8 system prompts of ~900 tokens x 6 questions, shuffled, 2 workers",
        "kv_blocks_per_worker": KV_BLOCKS, "block_size": BLOCK_SIZE, "hit_rate": rates})
    assert rates["prefix"] > rates["round_robin"] + 0.15


def worker_counter(text: str, name: str) -> dict[str, float]:
    out = {}
    for m in re.finditer(rf'^{name}\{{model="tiny",worker="([^"]+)"\}} ([0-9.e+]+)$', text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def test_router_prompt_tokens_equal_each_workers_own_counter(router_for, fleet, client):
    router = router_for("prefix")
    router.fleet = fleet
    _, vllm_prompts = run_workload(client(router), router, seed=7)
    mine = worker_counter(router.metrics_text(), "kvroute_worker_prompt_tokens_total")
    assert {u: int(mine.get(u, 0)) for u in fleet.urls} == vllm_prompts
    cached = worker_counter(router.metrics_text(), "kvroute_worker_cached_prompt_tokens_total")
    predicted = worker_counter(router.metrics_text(), "kvroute_worker_predicted_cached_tokens_total")
    assert sum(cached.values()) > 0 and sum(predicted.values()) > 0


def _model_sample(text: str, name: str) -> float:
    found = re.search(rf'^{name}\{{model="tiny"\}} ([0-9.e+-]+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_the_routers_own_time_is_a_small_part_of_vllms_time_to_first_token(router_for, client):
    """kvroute_router_added_seconds counts each answered request once, and holds kvroute's
    own time, well under what the workers took to their first token."""
    router = router_for("prefix")
    c = client(router)
    before = router.metrics_text()
    system = system_prompt(random.Random(11), 300)
    for q in range(4):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Question {q}?"}]
        chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=3, stream=True))
        assert chunks[-1].choices[0].finish_reason == "length"
        c.chat.completions.create(model="tiny", messages=messages, max_tokens=3)
    after = router.metrics_text()
    delta = {n: _model_sample(after, n) - _model_sample(before, n)
             for n in ("kvroute_router_added_seconds_count", "kvroute_router_added_seconds_sum",
                       "kvroute_retries_total")}
    ttft = sum(worker_counter(after, "kvroute_ttft_seconds_sum").values()) - sum(
        worker_counter(before, "kvroute_ttft_seconds_sum").values())
    answered = _ok_requests(after) - _ok_requests(before)
    # A request answered on a retry (say, over a pooled connection the worker had closed) is left out.
    counted = delta["kvroute_router_added_seconds_count"]
    assert counted == answered - delta["kvroute_retries_total"] >= 4, (counted, answered, delta)
    assert 0 < delta["kvroute_router_added_seconds_sum"] < ttft / 2


def _ok_requests(text: str) -> float:
    return sum(float(v) for v in re.findall(
        r'^kvroute_worker_requests_total\{model="tiny",status="ok",worker="[^"]+"\} ([0-9.e+]+)$', text, re.M))


def _in_flight(router, worker_url: str) -> int:
    pattern = rf'^kvroute_worker_in_flight_requests\{{[^}}]*worker="{re.escape(worker_url)}"[^}}]*\}} ([0-9.]+)$'
    found = re.search(pattern, router.metrics_text(), re.M)
    return int(float(found.group(1))) if found else 0


@pytest.mark.kills_worker
def test_killing_a_worker_mid_run_loses_no_request_that_had_not_started_streaming(router_for, fleet, client):
    router = router_for("round_robin")
    c = client(router)
    outcomes: list[tuple[int, bool, bool, str]] = []  # (n, stream, ok, detail)
    lock = threading.Lock()
    started_streams: set[int] = set()

    def one(n: int) -> None:
        messages = [{"role": "user", "content": f"Tell me a long story number {n}."}]
        extra = {"ignore_eos": True}
        # Not n % 2: round robin over two workers would then send every stream to one worker
        # and every non-streamed request to the other, and the kill would hit only one kind.
        stream = n % 4 in (1, 2)
        try:
            if stream:
                parts = []
                chunks = c.chat.completions.create(model="tiny", messages=messages, max_tokens=160,
                                                   stream=True, extra_body=extra)
                with lock:  # the router answered 200: its response began, so no retry from here on
                    started_streams.add(n)
                for ch in chunks:
                    if ch.choices:
                        parts.append(ch.choices[0].delta.content or "")
                ok = bool(parts)
            else:
                r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=160, extra_body=extra)
                ok = r.usage.completion_tokens == 160
            detail = ""
        except Exception as exc:  # recorded and judged below
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        with lock:
            outcomes.append((n, stream, ok, detail))

    victim = fleet.workers[1]
    threads: list[threading.Thread] = []

    def launch() -> None:
        threads.append(threading.Thread(target=one, args=(len(threads),)))
        threads[-1].start()
        time.sleep(0.03)

    # Kill once the router has consecutive requests (so both kinds) in flight on the victim;
    # a fixed moment can find every request there finished, or not yet sent, and prove nothing.
    killed_with, seen = None, []
    deadline = time.monotonic() + 60
    while killed_with is None and time.monotonic() < deadline and len(threads) < 300:
        launch()
        if len(threads) >= 8:
            seen.append(_in_flight(router, victim.url))
            if seen[-1] >= 3:
                kill_worker(victim)  # left dead: conftest.py's whole_fleet restarts it if a test follows
                killed_with = seen[-1]
    for _ in range(12):  # sent while the router may not yet know the victim is gone
        launch()
    for t in threads:
        t.join(120)
    assert killed_with is not None, f"the victim never had 3 requests in flight: {seen}"
    assert len(outcomes) == len(threads)
    failed = [(n, s, d) for n, s, ok, d in outcomes if not ok]
    warnings = [line for line in router.log_path.read_text().splitlines() if "WARNING" in line]
    # Only streams that had already sent bytes to the client may fail.
    assert all(stream and n in started_streams for n, stream, _ in failed), "\n".join(map(repr, failed + warnings))
    # The kill really hit requests in flight or new connections, which were retried.
    text = router.metrics_text()
    retries = re.search(r'^kvroute_retries_total\{model="tiny"\} ([0-9.]+)$', text, re.M)
    assert retries and float(retries.group(1)) >= 1, "\n".join(warnings)
    assert not re.search(r'^kvroute_retries_refused_total\{.*\} [1-9]', text, re.M), text
