"""Tier choice: thresholds, batching, forcing a tier, and tiered config validation."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvroute.benchmarks.backends.mock import fake_worker
from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.config import ClassifierConfig, config_from_dict
from kvroute.router.errors import ConfigError
from kvroute.router.metrics import RouterMetrics
from kvroute.router.tiers import TierChooser, prompt_text


class LengthScorer:
    """Scores by prompt length; records batch sizes. Stands in for the trained model."""

    threshold = 0.5
    version = "test"

    def __init__(self):
        self.batches: list[int] = []

    def score(self, prompts):
        self.batches.append(len(prompts))
        return [min(1.0, len(p) / 100) for p in prompts]


def chooser(n_tiers=2, thresholds=None, **cfg) -> TierChooser:
    c = TierChooser("auto", ClassifierConfig(thresholds=thresholds, **cfg), n_tiers,
                    ThreadPoolExecutor(1), RouterMetrics())
    c.scorer = LengthScorer()
    return c


async def test_scores_at_or_above_the_threshold_go_to_the_strong_tier():
    c = chooser()
    assert (await c.choose("short"))[0] == 0
    assert (await c.choose("x" * 80))[0] == 1
    assert c.tier_for(0.5) == 1 and c.tier_for(0.49) == 0


async def test_three_tiers_use_configured_thresholds():
    c = chooser(3, (0.3, 0.7))
    assert [c.tier_for(s) for s in (0.1, 0.3, 0.69, 0.7, 1.0)] == [0, 1, 1, 2, 2]


async def test_concurrent_requests_are_scored_in_one_batch():
    c = chooser(batch_window_ms=20)
    results = await asyncio.gather(*(c.choose("y" * n) for n in (1, 60, 5, 90)))
    assert [tier for tier, _ in results] == [0, 1, 0, 1]
    assert c.scorer.batches == [4]


async def test_max_batch_flushes_early():
    c = chooser(batch_window_ms=10_000, max_batch=3)
    await asyncio.wait_for(asyncio.gather(*(c.choose("z") for _ in range(3))), 2)
    assert c.scorer.batches == [3]


def test_prompt_text_reads_the_last_user_message_or_the_prompt():
    body = {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
                         {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]}
    assert prompt_text(body) == "q2"
    assert prompt_text({"prompt": ["p", "q"]}) == "p"


@pytest.mark.parametrize("model, key", [
    ({"name": "auto", "tiers": []}, "models[0].tiers"),
    ({"name": "auto", "workers": ["http://a:1"], "tiers": [{"name": "s", "workers": ["http://a:1"]}]},
     "models[0].workers"),
    ({"name": "auto", "tiers": [{"workers": ["http://a:1"]}]}, "models[0].tiers[0].name"),
    ({"name": "auto", "tiers": [{"name": "s", "workers": ["http://a:1"]}, {"name": "s", "workers": ["http://b:1"]}]},
     "models[0].tiers[1].name"),
    ({"name": "auto", "tiers": [{"name": "s", "workers": ["http://a:1"], "price": {"input_per_m": -1}}]},
     "models[0].tiers[0].price.input_per_m"),
    ({"name": "auto", "tiers": [{"name": "s", "workers": ["http://a:1"]}, {"name": "m", "workers": ["http://b:1"]},
                                {"name": "l", "workers": ["http://c:1"]}]}, "models[0].classifier.thresholds"),
    ({"name": "auto", "tiers": [{"name": "s", "workers": ["http://a:1"]}, {"name": "l", "workers": ["http://b:1"]}],
      "classifier": {"thresholds": [0.9, 0.1]}}, "models[0].classifier.thresholds"),
    ({"name": "auto", "tiers": [{"name": "s"}]}, "models[0].tiers[0].workers"),
    ({"name": "m", "workers": ["http://a:1"], "classifier": {}}, "models[0].classifier"),
])
def test_tiered_config_errors_name_the_key(model, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"models": [model]})
    assert err.value.key == key


async def test_a_request_can_force_a_tier_and_the_response_names_it(aiohttp_client, aiohttp_server):
    small, large = await aiohttp_server(fake_worker("small")), await aiohttp_server(fake_worker("large"))
    url = lambda s: str(s.make_url("")).rstrip("/")  # noqa: E731
    cfg = config_from_dict({"models": [{"name": "auto", "tiers": [
        {"name": "small", "workers": [url(small)]},
        {"name": "large", "workers": [url(large)], "upstream_model": "big-model"},
    ], "classifier": {"thresholds": [0.5]}}], "health": {"interval_s": 60}})
    app = create_app(cfg)
    served = app[keys.ROUTES].get("auto")
    served.chooser.load = _no_load(served.chooser)  # the real classifier is tested in integration
    client = await aiohttp_client(app)
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    resp = await client.post("/v1/chat/completions", json=body, headers={"x-kvroute-tier": "large"})
    assert resp.headers["x-kvroute-tier"] == "large"
    assert (await resp.json())["choices"][0]["message"]["content"] == "hi from large"
    resp = await client.post("/v1/chat/completions", json=body)  # short prompt: small tier
    assert resp.headers["x-kvroute-tier"] == "small"
    resp = await client.post("/v1/chat/completions", json=body, headers={"x-kvroute-tier": "huge"})
    assert resp.status == 400 and "valid: small, large" in (await resp.json())["error"]["message"]
    metrics = (await (await client.get("/metrics")).read()).decode()
    assert 'kvroute_tier_requests_total{model="auto",tier="large"} 1.0' in metrics
    health = await (await client.get("/health")).json()
    assert [t["tier"] for t in health["models"]["auto"]["tiers"]] == ["small", "large"]


def _no_load(c: TierChooser):
    async def load() -> None:
        c.scorer = LengthScorer()
        c.version = c.scorer.version

    return load


async def test_a_batch_being_scored_is_held_until_it_is_done():
    import gc
    import threading

    from tests.clock import until

    gate = threading.Event()

    class Gated(LengthScorer):
        def score(self, prompts):
            gate.wait(5)
            return super().score(prompts)

    c = chooser(batch_window_ms=1)
    c.scorer = Gated()
    waiting = asyncio.ensure_future(c.choose("x"))
    await until(lambda: len(c._scoring) == 1)
    gc.collect()  # the loop holds tasks weakly: only the chooser's reference keeps this one
    assert len(c._scoring) == 1
    gate.set()
    assert (await waiting)[0] == 0
    await until(lambda: not c._scoring)


async def test_a_failing_batch_fails_its_callers_and_a_bug_is_logged(caplog):
    class Failing(LengthScorer):
        def score(self, prompts):
            raise RuntimeError("scorer down")

    c = chooser(batch_window_ms=1)
    c.scorer = Failing()
    with pytest.raises(RuntimeError, match="scorer down"):
        await c.choose("x")

    class BrokenMetric:
        def labels(self, *_):
            raise KeyError("a bug after scoring")

    c = chooser(batch_window_ms=1)
    c.metrics.classifier_seconds = BrokenMetric()
    with pytest.raises(RuntimeError, match="ended without a score"):
        await asyncio.wait_for(c.choose("x"), 2)  # never left waiting
    await c.close()
    assert any("scoring a classifier batch failed" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_tokenizer_classifier_and_answer_scorer_have_their_own_executors(aiohttp_client, aiohttp_server):
    small, large = [str((await aiohttp_server(fake_worker(n))).make_url("")).rstrip("/") for n in ("s", "l")]
    cfg = config_from_dict({"models": [{"name": "auto", "mode": "cascade", "classifier": {},
                                        "cascade": {"answer_model": "rules"},
                                        "tiers": [{"name": "small", "workers": [small]},
                                                  {"name": "large", "workers": [large]}]}],
                            "health": {"interval_s": 60}})
    app = create_app(cfg)
    pools = app[keys.EXECUTORS]
    served = app[keys.ROUTES].get("auto")
    assert len({id(pools.tokenizer), id(pools.classifier), id(pools.judge)}) == 3
    assert all(t.prefixer.executor is pools.tokenizer for t in served.tiers)
    assert served.chooser.executor is pools.classifier and served.judge.executor is pools.judge
    served.chooser.load = served.chooser.close = _noop  # no classifier to load: only the wiring counts
    client = await aiohttp_client(app)
    await client.close()  # the cleanup contexts run
    for pool in (pools.tokenizer, pools.classifier, pools.judge):
        with pytest.raises(RuntimeError, match="shutdown"):
            pool.submit(int)


async def _noop() -> None:
    return None


@pytest.mark.parametrize("path, body", [
    ("/inference/v1/generate", {"token_ids": list(range(1, 200)), "sampling_params": {"max_tokens": 2}}),
    ("/generative_scoring", {"query": "Is this a question?", "items": ["yes", "no"], "label_token_ids": [5]}),
])
async def test_token_ids_stay_on_the_first_tier_unless_one_is_forced(aiohttp_client, aiohttp_server, path, body):
    """Token ids (a generate request's prompt, generative scoring's labels) are one tier's
    tokenizer's: the classifier does not read them or move them."""
    small, large = await aiohttp_server(fake_worker("small")), await aiohttp_server(fake_worker("large"))
    url = lambda s: str(s.make_url("")).rstrip("/")  # noqa: E731
    cfg = config_from_dict({"models": [{"name": "auto", "tiers": [
        {"name": "small", "workers": [url(small)]}, {"name": "large", "workers": [url(large)]},
    ], "classifier": {"thresholds": [0.0]}}], "health": {"interval_s": 60}})  # every question scores strong
    app = create_app(cfg)
    served = app[keys.ROUTES].get("auto")
    served.chooser.load = _no_load(served.chooser)
    client = await aiohttp_client(app)
    chat = await client.post("/v1/chat/completions", json={"model": "auto", "messages": [
        {"role": "user", "content": "hi"}], "max_tokens": 2})
    assert chat.headers["x-kvroute-tier"] == "large" and served.chooser.scorer.batches == [1]
    body = {"model": "auto", **body}
    resp = await client.post(path, json=body)
    assert resp.status == 200 and resp.headers["x-kvroute-tier"] == "small"
    forced = await client.post(path, json=body, headers={"x-kvroute-tier": "large"})
    assert forced.headers["x-kvroute-tier"] == "large" and served.chooser.scorer.batches == [1]
