"""vLLM's ``/tokenize`` and ``/detokenize`` through the router in front of the real fleet:
the worker's own answers, and a chat's token count that matches what the chat then costs."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

pytestmark = pytest.mark.integration


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_tokenize_and_detokenize_through_the_router(router_for, fleet):
    router = router_for("prefix")
    prompt = {"model": "tiny", "prompt": "Route each request to the worker that holds its prefix."}
    tokens = post(f"{router.url}/tokenize", prompt)
    assert tokens == post(f"{fleet.urls[0]}/tokenize", prompt) and tokens["count"] == len(tokens["tokens"]) > 5
    back = post(f"{router.url}/detokenize", {"model": "tiny", "tokens": tokens["tokens"]})
    assert back["prompt"].endswith(prompt["prompt"])

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a KV cache?"}]
    counted = post(f"{router.url}/tokenize", {"model": "tiny", "messages": messages})["count"]
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="x", max_retries=0, timeout=60)
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert chat.usage.prompt_tokens == counted  # count first, then send: the same tokens
