"""vLLM's ``/v1/chat/completions/batch`` (several conversations, one choice each, in one
request) through the router against the fake worker: keyed by its first conversation,
every conversation counted toward the estimates and reserved for, cut per conversation by a
budget, and bad input a 400 that names the field."""

from __future__ import annotations

import orjson
import pytest

from kvroute.benchmarks.backends.mock import SEEN
from kvroute.router.app import create_app
from kvroute.router.requests import CHAT, CHAT_BATCH, parse_request
from tests.clock import FakeClock
from tests.governance.conftest import worker_url
from tests.unit.apis import config, counter, refused

SYSTEM = {"role": "system", "content": "You answer questions about routers in one line. " * 30}
BATCH = [[SYSTEM, {"role": "user", "content": f"Question {i}: what is a KV cache?"}] for i in range(3)]


def parsed(kind: str, **body):
    return parse_request(kind, orjson.dumps({"model": "m", **body}), {})


def test_a_batch_is_read_as_its_first_conversation_and_counts_all_of_them():
    batch = parsed(CHAT_BATCH, messages=BATCH, max_tokens=5)
    chat = parsed(CHAT, messages=BATCH[0], max_tokens=5)
    assert batch.prompt_view["messages"] == chat.prompt_view["messages"] and batch.prompt_view["batch"] == BATCH[1:]
    assert batch.sequences == 3 and batch.max_tokens == 5 and batch.path == "/v1/chat/completions/batch"


async def test_a_batch_reaches_the_worker_keyed_by_its_first_conversation(aiohttp_client, upstream):
    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    first = await client.post("/v1/chat/completions/batch", json={"model": "tiny", "messages": BATCH,
                                                                  "max_tokens": 4})
    body = await first.json()
    assert first.status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert upstream.app[SEEN][-1] == {"model": "tiny-up", "messages": BATCH, "max_tokens": 4,
                                      "path": "/v1/chat/completions/batch"}
    again = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": BATCH[1]})
    assert int(again.headers["x-kvroute-predicted-cached-tokens"]) > 0  # the shared system prompt
    page = (await (await client.get("/metrics")).read()).decode()
    assert counter(page, "kvroute_worker_completion_tokens_total") == body["usage"]["completion_tokens"] + 3


async def test_a_budget_reserves_for_every_conversation_and_cuts_each_alike(aiohttp_client, upstream):
    governance = {"budgets": [{"name": "per-call", "scope": "request", "limit": {"tokens": 1500}}],
                  "estimate_factor": 1}
    client = await aiohttp_client(create_app(config(worker_url(upstream), governance=governance), clock=FakeClock()))
    resp = await client.post("/v1/chat/completions/batch", json={"model": "tiny", "messages": BATCH,
                                                                 "max_tokens": 5000})
    assert resp.status == 200, await resp.text()
    each = upstream.app[SEEN][-1]["max_tokens"]
    prompt = 3 * (len("".join(f"<{m['role']}>{m['content']}" for m in BATCH[0])) // 4)
    assert 0 < each <= (1500 - prompt) // 3 + 1  # the room left after three prompts, shared by three answers


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": BATCH[0]}, "messages"),  # one conversation is a chat, not a batch
    ({"messages": [BATCH[0], []]}, "messages[1]"),
    ({"messages": [[{"role": "robot", "content": "x"}]]}, "messages[0][0].role"),
    ({"messages": BATCH, "stream": True}, "stream"),
    ({"messages": BATCH, "chat_template_kwargs": "x"}, "chat_template_kwargs"),
])
async def test_bad_input_is_a_400_that_names_the_field(aiohttp_client, upstream, body, param):
    err = await refused(aiohttp_client, upstream, "/v1/chat/completions/batch", body)
    assert err["param"] == param, err


def test_a_prompt_log_keeps_every_conversation_of_a_batch_redacted():
    from kvroute.router.telemetry.config import parse_telemetry
    from kvroute.router.telemetry.promptlog import PromptLog

    log = PromptLog(parse_telemetry({"prompt_logs": {"enabled": True, "span": True}}).prompt_logs)
    batch = [*BATCH[:2], [{"role": "user", "content": "mail me at a.b@c.io"}]]
    part = log.request_part(parsed(CHAT_BATCH, messages=batch).prompt_view)
    assert part["messages"] == BATCH[0] and part["batch"][0] == BATCH[1]
    assert part["batch"][1][0]["content"] == "mail me at [EMAIL]"
