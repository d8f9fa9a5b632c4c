"""``/cohere/v2/chat`` through the router in front of the real fleet (workers run with the
cohere SDK and ``VLLM_ENABLE_COHERE_API=1``), with Cohere's own client: whole and streamed
answers, and the router's reading of a Cohere chat matching the prompt vLLM renders from
it, so an OpenAI chat of the same conversation afterwards goes to the same worker and the
hit the router predicts is the hit vLLM finds; its render, the same token ids."""

from __future__ import annotations

import secrets
import time

import cohere
import httpx
import openai
import pytest

from tests.integration.conftest import BLOCK_SIZE, run_router, short_lived_guesses

pytestmark = pytest.mark.integration


def test_the_cohere_client_through_the_router(fleet, tmp_path):
    # The clients' connections are closed before the test ends: pytest fails on a leaked socket.
    with run_router(short_lived_guesses(fleet), tmp_path) as router, httpx.Client(timeout=60) as http, \
            openai.OpenAI(base_url=f"{router.url}/v1", api_key="x", max_retries=0) as chat:
        check(router.url, http, chat)


def check(url: str, http: httpx.Client, chat: openai.OpenAI) -> None:
    client = cohere.ClientV2(api_key="x", base_url=f"{url}/cohere", httpx_client=http)
    system = f"[{secrets.token_hex(4)}] You answer for the platform team, briefly and exactly. " * 12
    question = "What does the router key a prompt by?"
    raw = client.with_raw_response.chat(model="tiny", max_tokens=3, messages=[
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": question}])
    answer = raw.data
    assert answer.message.content[0].text and answer.usage.tokens.output_tokens <= 3
    assert raw.headers["x-kvroute-predicted-cached-tokens"] == "0"
    worker = raw.headers["x-kvroute-worker"]

    # The same conversation as an OpenAI chat: vLLM renders both alike, and the router knows it.
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    time.sleep(1.0)  # the worker's KV events reach the router; its own guesses expire
    second = chat.chat.completions.with_raw_response.create(model="tiny", max_tokens=1, messages=messages)
    usage = second.parse().usage
    assert usage.prompt_tokens == answer.usage.tokens.input_tokens  # the same prompt, token for token
    cached = usage.prompt_tokens_details.cached_tokens
    assert second.headers["x-kvroute-worker"] == worker and cached > 0
    assert cached <= int(second.headers["x-kvroute-predicted-cached-tokens"]) <= cached + BLOCK_SIZE

    rendered = http.post(f"{url}/cohere/v2/chat/render", json={"model": "tiny", "messages": messages}).json()
    assert rendered["model"] == "tiny" and len(rendered["token_ids"]) == usage.prompt_tokens  # the same prompt

    events = list(client.chat_stream(model="tiny", max_tokens=3, messages=messages))
    assert [e.type for e in events][0] == "message-start" and events[-1].type == "message-end"
    end = events[-1].delta.usage
    text = "".join(e.delta.message.content.text for e in events if e.type == "content-delta")
    assert text and end.tokens.output_tokens <= 3 and end.cached_tokens > 0  # the system prompt, at least

    page = http.get(f"{url}/metrics").text
    completion = sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
                     if line.startswith("kvroute_worker_completion_tokens_total{"))
    assert completion == answer.usage.tokens.output_tokens + usage.completion_tokens + end.tokens.output_tokens

    with pytest.raises(cohere.BadRequestError) as bad:
        client.chat(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=0)
    assert "max_tokens" in bad.value.body["message"]
