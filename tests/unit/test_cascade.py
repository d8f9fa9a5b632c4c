"""Cascade escalation (router/cascade.py) against fake upstream tiers, with a forced confidence."""

from __future__ import annotations

import socket

import orjson
import pytest

from kvroute.benchmarks.backends.mock import SEEN, fake_worker
from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.cascade import to_sse
from kvroute.router.confidence import Answer, parse_answer, rules
from kvroute.router.config import config_from_dict
from kvroute.router.errors import ConfigError


class FixedScorer:
    """Stands in for the answer scorer: every answer gets the same confidence."""

    version = "test"

    def __init__(self, p: float):
        self.p, self.calls = p, []

    def score(self, questions, answers):
        self.calls.append((list(questions), list(answers)))
        return [self.p] * len(questions)


def closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed


def url(server) -> str:
    return str(server.make_url("")).rstrip("/")


async def make(aiohttp_client, small: str, large: str, confidence: float | None, **cascade):
    cfg = config_from_dict({"models": [{"name": "auto", "mode": "cascade",
                                        "cascade": {"threshold": 0.5, "answer_model": "rules", **cascade},
                                        "tiers": [{"name": "small", "workers": [small]},
                                                  {"name": "large", "workers": [large]}]}],
                            "health": {"interval_s": 60}})
    app = create_app(cfg)
    cascade_ = app[keys.ROUTES].get("auto").judge
    if confidence is not None:
        cascade_.scorer = FixedScorer(confidence)
    return await aiohttp_client(app), cascade_


BODY = {"model": "auto", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 5}


@pytest.fixture
async def tiers(aiohttp_server):
    return await aiohttp_server(fake_worker("small")), await aiohttp_server(fake_worker("large"))


async def metrics_text(client) -> str:
    return (await (await client.get("/metrics")).read()).decode()


async def test_low_confidence_escalates_and_usage_counts_both_tries(aiohttp_client, tiers):
    small, large = tiers
    client, cascade = await make(aiohttp_client, url(small), url(large), confidence=0.2)
    resp = await client.post("/v1/chat/completions", json=BODY)
    body = await resp.json()
    assert resp.status == 200
    assert resp.headers["x-kvroute-tier"] == "large" and resp.headers["x-kvroute-escalated"] == "true"
    assert body["choices"][0]["message"]["content"] == "hi from large"
    assert body["usage"]["prompt_tokens"] == 22 and body["usage"]["completion_tokens"] == 6
    assert body["usage"]["total_tokens"] == 28
    assert cascade.scorer.calls == [(["What is 2 + 2?"], ["hi from small"])]
    assert small.app[SEEN][0]["stream"] is False and large.app[SEEN][0]["messages"] == BODY["messages"]
    text = await metrics_text(client)
    assert 'kvroute_cascade_escalations_total{from="small",model="auto",to="large"} 1.0' in text
    assert 'kvroute_cascade_wasted_tokens_total{model="auto"} 14.0' in text
    # each try's tokens go to the worker that spent them
    assert f'kvroute_worker_prompt_tokens_total{{model="auto",worker="{url(small)}"}} 11.0' in text
    assert f'kvroute_worker_completion_tokens_total{{model="auto",worker="{url(large)}"}} 3.0' in text


async def test_high_confidence_keeps_the_cheap_answer(aiohttp_client, tiers):
    small, large = tiers
    client, _ = await make(aiohttp_client, url(small), url(large), confidence=0.9)
    resp = await client.post("/v1/chat/completions", json=BODY)
    body = await resp.json()
    assert resp.headers["x-kvroute-tier"] == "small" and resp.headers["x-kvroute-escalated"] == "false"
    assert body["choices"][0]["message"]["content"] == "hi from small"
    assert body["usage"]["total_tokens"] == 14
    assert large.app[SEEN] == []
    assert "kvroute_cascade_escalations_total{" not in await metrics_text(client)


async def test_a_failing_cheap_tier_escalates(aiohttp_client, tiers):
    _, large = tiers
    client, _ = await make(aiohttp_client, closed_url(), url(large), confidence=0.9)
    resp = await client.post("/v1/chat/completions", json=BODY)
    assert resp.status == 200 and resp.headers["x-kvroute-escalated"] == "true"
    assert (await resp.json())["usage"]["total_tokens"] == 14  # the failed try spent nothing


async def test_a_failing_strong_tier_is_a_clean_error(aiohttp_client, tiers):
    small, _ = tiers
    client, _ = await make(aiohttp_client, url(small), closed_url(), confidence=0.1)
    resp = await client.post("/v1/chat/completions", json=BODY)
    assert resp.status in (502, 503)
    err = (await resp.json())["error"]
    assert err["message"] and err["type"]


async def test_rules_force_escalation_without_a_model(aiohttp_client, tiers):
    small, large = tiers
    client, _ = await make(aiohttp_client, url(small), url(large), confidence=None,
                           verifiers=[{"regex": r"\d+"}])  # the fake says no number
    resp = await client.post("/v1/chat/completions", json=BODY)
    assert resp.headers["x-kvroute-escalated"] == "true"
    assert rules(Answer("ok", "length")).reason == "length"
    assert rules(Answer("   ", "stop")).reason == "empty"
    assert rules(Answer("I'm sorry, I can't help with that.", "stop")).reason == "refusal"
    assert rules(Answer("4", "stop", (-3.0, -4.0)), min_mean_logprob=-1.0).reason == "logprob"
    assert rules(Answer('{"a": 1}', "stop"), [{"json_schema": {"type": "object", "required": ["b"]}}]).reason \
        == "verifier"
    assert rules(Answer("The answer is 4", "stop"), [{"regex": r"\d+"}]) is None
    lp = parse_answer({"choices": [{"message": {"content": "4"}, "finish_reason": "stop",
                                    "logprobs": {"content": [{"logprob": -0.5}, {"logprob": -1.5}]}}]})
    assert lp.logprobs == (-0.5, -1.5)


def parse_sse(raw: bytes) -> list:
    events = [e for e in raw.decode().split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    return [orjson.loads(e[6:]) for e in events[:-1]]


@pytest.mark.parametrize("policy", ["buffer", "first_tokens"])
@pytest.mark.parametrize("confidence, tier", [(0.9, "small"), (0.1, "large")])
async def test_streaming_policies_deliver_well_formed_sse(aiohttp_client, tiers, policy, confidence, tier):
    small, large = tiers
    client, _ = await make(aiohttp_client, url(small), url(large), confidence, stream_policy=policy,
                           first_tokens=2)
    resp = await client.post("/v1/chat/completions", json={**BODY, "stream": True,
                                                           "stream_options": {"include_usage": True}})
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["x-kvroute-tier"] == tier
    chunks = parse_sse(await resp.read())
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == f"hi from {tier}"
    usage = chunks[-1]["usage"]
    tries = 1 if (policy == "buffer" and tier == "small") else 2
    assert usage["total_tokens"] == 14 * tries
    if policy == "first_tokens":
        assert small.app[SEEN][0]["max_tokens"] == 2 and small.app[SEEN][0]["stream"] is False


async def test_without_usage_requested_the_stream_has_no_usage_chunk(aiohttp_client, tiers):
    small, large = tiers
    client, _ = await make(aiohttp_client, url(small), url(large), confidence=0.9)
    resp = await client.post("/v1/chat/completions", json={**BODY, "stream": True})
    assert all("usage" not in c for c in parse_sse(await resp.read()))


def test_to_sse_for_completions():
    events = to_sse({"id": "c", "choices": [{"index": 0, "text": "abc", "finish_reason": "stop"}],
                     "usage": {"total_tokens": 3}}, chat=False, include_usage=True)
    assert orjson.loads(events[0][6:])["choices"][0]["text"] == "abc"
    assert events[-1] == b"data: [DONE]\n\n" and b'"usage"' in events[-2]


async def test_forced_tier_bypasses_the_cascade(aiohttp_client, tiers):
    small, large = tiers
    client, _ = await make(aiohttp_client, url(small), url(large), confidence=0.1)
    resp = await client.post("/v1/chat/completions", json=BODY, headers={"x-kvroute-tier": "small"})
    assert resp.headers["x-kvroute-tier"] == "small" and small.app[SEEN] and not large.app[SEEN]


@pytest.mark.parametrize("cascade, key", [
    ({"threshold": 2}, "models[0].cascade.threshold"),
    ({"band": [0.8, 0.2]}, "models[0].cascade.band"),
    ({"stream_policy": "guess"}, "models[0].cascade.stream_policy"),
    ({"first_tokens": 0}, "models[0].cascade.first_tokens"),
    ({"answer_model": "/nope"}, "models[0].cascade.answer_model"),
    ({"verifiers": [{"regex": "("}]}, "models[0].cascade.verifiers[0].regex"),
    ({"verifiers": [{"shout": 1}]}, "models[0].cascade.verifiers[0]"),
    ({"bogus": 1}, "models[0].cascade.bogus"),
])
def test_cascade_config_errors_name_the_key(cascade, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"models": [{"name": "auto", "mode": "cascade", "cascade": cascade, "tiers": [
            {"name": "s", "workers": ["http://a:1"]}, {"name": "l", "workers": ["http://b:1"]}]}]})
    assert err.value.key == key


def test_mode_is_validated():
    tiers = [{"name": "s", "workers": ["http://a:1"]}, {"name": "l", "workers": ["http://b:1"]}]
    with pytest.raises(ConfigError) as err:
        config_from_dict({"models": [{"name": "auto", "mode": "waterfall", "tiers": tiers}]})
    assert err.value.key == "models[0].mode"
    with pytest.raises(ConfigError) as err:
        config_from_dict({"models": [{"name": "auto", "cascade": {}, "tiers": tiers}]})
    assert err.value.key == "models[0].cascade"
    cfg = config_from_dict({"models": [{"name": "auto", "mode": "cascade", "tiers": tiers}]})
    assert cfg.models[0].cascade.band == (0.0, 1.0) and cfg.models[0].classifier is None


async def test_governance_charges_both_tries_at_their_tiers_prices(aiohttp_client, tiers):
    small, large = tiers
    cfg = config_from_dict({"models": [{"name": "auto", "mode": "cascade", "cascade": {"answer_model": "rules"},
                                        "tiers": [{"name": "small", "workers": [url(small)],
                                                   "price": {"input_per_m": 1.0, "output_per_m": 1.0}},
                                                  {"name": "large", "workers": [url(large)],
                                                   "price": {"input_per_m": 100.0, "output_per_m": 100.0}}]}],
                            "health": {"interval_s": 60},
                            "governance": {"budgets": [{"name": "day", "scope": "global", "window": "day",
                                                        "limit": {"tokens": 100000}}]}})
    app = create_app(cfg)
    app[keys.ROUTES].get("auto").judge.scorer = FixedScorer(0.0)
    client = await aiohttp_client(app)
    resp = await client.post("/v1/chat/completions", json=BODY)
    assert resp.status == 200 and resp.headers["x-kvroute-escalated"] == "true"
    await app[keys.GOVERNOR].drain()
    text = await metrics_text(client)
    tokens = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("kvroute_spend_tokens_total{") and 'kind="cached"' not in line)
    usd = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("kvroute_spend_usd_total{"))
    assert tokens == 28  # 14 per try
    assert usd == pytest.approx(14 * 1.0 / 1e6 + 14 * 100.0 / 1e6)


class LengthScorer:
    """Prompt score by length, standing in for the tier classifier."""

    threshold, version = 0.5, "test"

    def score(self, prompts):
        return [min(1.0, len(p) / 100) for p in prompts]


async def test_classifier_band_skips_the_cheap_try_or_the_check(aiohttp_client, tiers):
    small, large = tiers
    cfg = config_from_dict({"models": [{"name": "auto", "mode": "cascade", "classifier": {},
                                        "cascade": {"band": [0.1, 0.6], "answer_model": "rules"},
                                        "tiers": [{"name": "small", "workers": [url(small)]},
                                                  {"name": "large", "workers": [url(large)]}]}],
                            "health": {"interval_s": 60}})
    app = create_app(cfg)
    served = app[keys.ROUTES].get("auto")

    async def load() -> None:
        served.chooser.scorer = LengthScorer()
        served.chooser.version = "test"

    served.chooser.load = load
    served.judge.scorer = FixedScorer(0.0)  # would always escalate when checked
    client = await aiohttp_client(app)

    def ask(n: int) -> dict:
        return {**BODY, "messages": [{"role": "user", "content": "x" * n}]}

    resp = await client.post("/v1/chat/completions", json=ask(80))  # >= hi: strong only
    assert resp.headers["x-kvroute-tier"] == "large" and resp.headers["x-kvroute-escalated"] == "false"
    assert small.app[SEEN] == []
    resp = await client.post("/v1/chat/completions", json=ask(5))  # < lo: cheap, no check
    assert resp.headers["x-kvroute-tier"] == "small" and served.judge.scorer.calls == []
    resp = await client.post("/v1/chat/completions", json=ask(30))  # in the band: cascade
    assert resp.headers["x-kvroute-escalated"] == "true" and len(served.judge.scorer.calls) == 1


async def test_overhead_bench_runs():
    from kvroute.benchmarks.cascade_bench import bench

    res = await bench(3)
    assert res["requests"] == 3 and "overhead_ms_p50" in res


async def test_an_escalation_a_budget_refuses_keeps_the_cheap_answer(aiohttp_client, tiers):
    small, large = tiers
    cfg = config_from_dict({"models": [{"name": "auto", "mode": "cascade", "cascade": {"answer_model": "rules"},
                                        "tiers": [{"name": "small", "workers": [url(small)]},
                                                  {"name": "large", "workers": [url(large)],
                                                   "price": {"input_per_m": 1e6, "output_per_m": 1e6}}]}],
                            "health": {"interval_s": 60},
                            "governance": {"budgets": [{"name": "per-call", "scope": "request",
                                                        "limit": {"usd": 0.5}}]}})
    app = create_app(cfg)
    app[keys.ROUTES].get("auto").judge.scorer = FixedScorer(0.0)
    client = await aiohttp_client(app)
    resp = await client.post("/v1/chat/completions", json=BODY)
    body = await resp.json()
    assert resp.status == 200, body
    assert resp.headers["x-kvroute-tier"] == "small" and resp.headers["x-kvroute-escalated"] == "false"
    assert body["usage"]["total_tokens"] == 14 and not large.app[SEEN]
    assert "kvroute_cascade_escalations_total{" not in await metrics_text(client)
