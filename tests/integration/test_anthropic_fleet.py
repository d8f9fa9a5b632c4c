"""``/v1/messages`` through the router in front of the real fleet, with Anthropic's own
client (as coding agents pointed at a vLLM fleet use it): whole and streamed answers, and
the router's reading of a Messages prompt matching what vLLM renders, so the tokens it
predicts cached are the tokens vLLM finds."""

from __future__ import annotations

import secrets

import anthropic
import pytest

pytestmark = pytest.mark.integration


def test_the_anthropic_client_through_the_router(router_for):
    router = router_for("prefix")
    client = anthropic.Anthropic(base_url=router.url, api_key="x", max_retries=0, timeout=60)
    system = f"[{secrets.token_hex(4)}] You are a coding agent for the platform team; answer briefly. " * 12
    first = client.messages.with_raw_response.create(
        model="tiny", max_tokens=4, system=system, messages=[{"role": "user", "content": "What is a KV cache?"}])
    answer = first.parse()
    assert answer.type == "message" and answer.content[0].text and answer.usage.output_tokens <= 4
    assert first.headers["x-kvroute-predicted-cached-tokens"] == "0"
    second = client.messages.with_raw_response.create(
        model="tiny", max_tokens=4, system=system,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Why route by prefix?"}]}])
    assert second.headers["x-kvroute-worker"] == first.headers["x-kvroute-worker"]
    cached = second.parse().usage.cache_read_input_tokens
    assert cached > 0 and int(second.headers["x-kvroute-predicted-cached-tokens"]) == cached

    with client.messages.stream(model="tiny", max_tokens=4, system=system,
                                messages=[{"role": "user", "content": "And a stream?"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text and final.usage.cache_read_input_tokens > 0  # the system prompt, at least
    counted = client.messages.count_tokens(model="tiny", system=system,
                                           messages=[{"role": "user", "content": "And a stream?"}])
    usage = final.usage
    assert counted.input_tokens == usage.input_tokens + usage.cache_read_input_tokens + \
        (usage.cache_creation_input_tokens or 0)
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="tiny", max_tokens=4, messages=[{"role": "system", "content": "x"}])
    assert "messages[0].role" in str(bad.value)
