"""``/v1/responses`` through the router in front of the real fleet: the openai client's
``responses`` API, whole and streamed, and the router's reading of a Responses prompt
matching what vLLM renders, so the tokens it predicts cached are the tokens vLLM finds; and
a conversation kept by vLLM's store (``previous_response_id``), which only the worker that
holds it can continue."""

from __future__ import annotations

import re
import secrets

import openai
import pytest

pytestmark = pytest.mark.integration


def counter(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))


def test_the_openai_responses_api_through_the_router(router_for):
    router = router_for("prefix")
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="x", max_retries=0, timeout=60)
    instructions = f"[{secrets.token_hex(4)}] You answer questions for the platform team, briefly. " * 12
    first = client.responses.with_raw_response.create(model="tiny", instructions=instructions,
                                                      input="What is a KV cache?", max_output_tokens=4)
    answer = first.parse()
    assert answer.status in ("completed", "incomplete") and answer.output_text
    assert answer.usage.output_tokens <= 4 and first.headers["x-kvroute-predicted-cached-tokens"] == "0"
    second = client.responses.with_raw_response.create(
        model="tiny", instructions=instructions, max_output_tokens=4,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Why route by prefix?"}]}])
    worker = second.headers["x-kvroute-worker"]
    assert worker == first.headers["x-kvroute-worker"]
    cached = second.parse().usage.input_tokens_details.cached_tokens
    assert cached > 0 and int(second.headers["x-kvroute-predicted-cached-tokens"]) == cached

    with client.responses.stream(model="tiny", instructions=instructions, input="And a stream?",
                                 max_output_tokens=4) as stream:
        deltas = sum(event.type == "response.output_text.delta" for event in stream)
        final = stream.get_final_response()
    assert 0 < deltas <= 4 and final.usage.input_tokens_details.cached_tokens > 0  # the instructions, at least
    metrics = router.metrics_text()
    assert counter(metrics, "kvroute_worker_completion_tokens_total") == \
        answer.usage.output_tokens + second.parse().usage.output_tokens + final.usage.output_tokens
    assert counter(metrics, "kvroute_worker_cached_prompt_tokens_total") == \
        cached + final.usage.input_tokens_details.cached_tokens


def test_a_stored_conversation_is_continued_on_the_worker_that_holds_it(router_for):
    """Round robin would send every other turn to the worker that does not hold the last
    response, which vLLM answers with a 404; each turn names the one before and all of them
    reach its worker, which finds the conversation in its KV cache."""
    router = router_for("round_robin")
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="x", max_retries=0, timeout=60)
    # A long first message, not instructions: a follow-up does not carry the instructions over.
    opening = f"[{secrets.token_hex(4)}] Keep a running tally for the platform team. " * 12 + "Start at zero."
    first = client.responses.with_raw_response.create(model="tiny", input=opening, max_output_tokens=4)
    holder, previous = first.headers["x-kvroute-worker"], first.parse().id
    cached = []
    for turn in range(3):
        follow = client.responses.with_raw_response.create(model="tiny", previous_response_id=previous,
                                                           input=f"Add {turn + 1}.", max_output_tokens=4)
        assert follow.headers["x-kvroute-worker"] == holder
        previous = follow.parse().id
        cached.append(follow.parse().usage.input_tokens_details.cached_tokens)
    # the conversation so far, in the KV cache of the worker that holds it
    assert min(cached) >= first.parse().usage.input_tokens // 2
    with client.responses.stream(model="tiny", previous_response_id=previous, input="And the total?",
                                 max_output_tokens=4) as stream:
        final = stream.get_final_response()
    assert client.responses.retrieve(final.id).id == final.id  # through the router, on its worker
    other = client.responses.with_raw_response.create(model="tiny", input="Unrelated.", max_output_tokens=2)
    assert other.headers["x-kvroute-worker"] != holder  # without previous_response_id, round robin goes on
    with pytest.raises(openai.NotFoundError, match="resp_nowhere"):
        client.responses.create(model="tiny", previous_response_id="resp_nowhere", input="?", max_output_tokens=2)


def test_a_background_response_is_cancelled_on_its_worker(router_for):
    """``background`` needs vLLM's store: the answer comes back queued, and its cancel and
    retrieval must reach the worker that runs it (another worker would answer 404). The tiny
    model may finish first, and then its worker says it cannot cancel a finished response."""
    router = router_for("round_robin")
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="x", max_retries=0, timeout=60)
    started = client.responses.create(model="tiny", input="Count to a thousand.", background=True,
                                      max_output_tokens=1500, extra_body={"ignore_eos": True})
    assert started.status in ("queued", "in_progress")
    try:
        assert client.responses.cancel(started.id).status == "cancelled"
    except openai.BadRequestError as exc:  # the holder's own answer: it had finished
        assert "Cannot cancel a synchronous response" in str(exc)
    assert client.responses.retrieve(started.id).status in ("cancelled", "completed", "incomplete")
