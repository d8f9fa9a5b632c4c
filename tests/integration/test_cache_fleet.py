"""The response cache in front of a real vLLM fleet, shared through a real Redis by two
router replicas, driven by the real ``openai`` client. That a hit never reached a worker is
read from vLLM's own counter, ``vllm:request_success_total``."""

from __future__ import annotations

import urllib.request
import uuid

import openai
import pytest

from tests.integration.conftest import run_router

pytestmark = pytest.mark.integration


def served_requests(fleet) -> float:
    """Requests the whole fleet finished, by vLLM's own count."""
    total = 0.0
    for url in fleet.urls:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("vllm:request_success_total{"):
                    total += float(line.rsplit(" ", 1)[1])
    return total


def client(router, key: str = "sk-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_repeats_are_served_once_by_the_fleet_across_two_replicas(fleet, redis_url, tmp_path):
    # patient timeouts: on a loaded CI machine a local Redis can take over the 0.5 s default to answer
    redis = {"url": redis_url, "prefix": f"it:{uuid.uuid4().hex[:8]}", "connect_timeout_s": 5, "timeout_s": 5}
    cfg = {"models": [{"name": "tiny", "workers": fleet.urls, "tokenizer": fleet.model_dir, "policy": "prefix"}],
           "cache": {"exact": {"ttl_s": 600}, "redis": redis}}
    messages = [{"role": "user", "content": f"Name a colour. ({uuid.uuid4().hex})"}]
    ask = {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0}
    with run_router(cfg, tmp_path) as one, run_router(cfg, tmp_path) as two:
        before = served_requests(fleet)
        raw = client(one).chat.completions.with_raw_response.create(**ask)
        first = raw.parse()
        assert raw.headers["x-kvroute-cache"] == "miss" and first.choices[0].message.content

        raw = client(one).chat.completions.with_raw_response.create(**ask)
        again = raw.parse()
        assert raw.headers["x-kvroute-cache"] == "hit"
        assert again.choices[0].message.content == first.choices[0].message.content
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens == first.usage.prompt_tokens

        raw = client(two).chat.completions.with_raw_response.create(**ask, stream=True,
                                                                     stream_options={"include_usage": True})
        assert raw.headers["x-kvroute-cache"] == "hit"  # the other replica's entry, through Redis
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == first.choices[0].message.content
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens
        assert served_requests(fleet) - before == 1  # three answers, one generation

        # A streamed miss fills the cache too; another API key never sees the entry.
        streamed = {**ask, "messages": [{"role": "user", "content": f"Count to three. ({uuid.uuid4().hex})"}]}
        text = "".join(c.choices[0].delta.content or "" for c in client(two).chat.completions.create(
            **streamed, stream=True) if c.choices)
        raw = client(one).chat.completions.with_raw_response.create(**streamed)
        assert raw.headers["x-kvroute-cache"] == "hit" and raw.parse().choices[0].message.content == text
        raw = client(one, key="sk-other").chat.completions.with_raw_response.create(**streamed)
        assert raw.headers["x-kvroute-cache"] == "miss"
        assert served_requests(fleet) - before == 3
