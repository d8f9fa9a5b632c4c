"""Telemetry against fake workers: GenAI spans, trace propagation, prompt logs and
per-request histograms (router/telemetry). The real-fleet test with an OTLP receiver is
tests/integration/test_telemetry_fleet.py."""

from __future__ import annotations

import json
import re

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kvroute.benchmarks.backends.mock import FAULTS, SEEN_HEADERS, fake_worker
from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from kvroute.router.errors import ConfigError
from kvroute.router.telemetry.config import parse_telemetry
from kvroute.router.telemetry.promptlog import PromptLog
from kvroute.router.telemetry.tracing import tracing_on

PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{PARENT_TRACE}-00f067aa0ba902b7-01"
BODY = {"model": "m", "messages": [{"role": "user", "content": "Mail me at jane.doe@example.com"}],
        "max_tokens": 5, "temperature": 0.5}


def url(server) -> str:
    return str(server.make_url("")).rstrip("/")


async def router(aiohttp_client, workers: list[str], telemetry: dict | None = None, exporter=None, **model):
    cfg = config_from_dict({"models": [{"name": "m", "workers": workers, "policy": "round_robin", **model}],
                            "health": {"interval_s": 60}, "telemetry": telemetry or {}})
    app = create_app(cfg, span_exporter=exporter)
    return await aiohttp_client(app)


def spans_of(client, exporter: InMemorySpanExporter) -> list:
    client.app[keys.TELEMETRY].tracing.provider.force_flush()
    return list(exporter.get_finished_spans())


@pytest.fixture
async def worker(aiohttp_server):
    return await aiohttp_server(fake_worker("w1"))


async def test_spans_follow_the_genai_conventions_and_continue_the_callers_trace(aiohttp_client, worker):
    exporter = InMemorySpanExporter()
    client = await router(aiohttp_client, [url(worker)], exporter=exporter)
    resp = await client.post("/v1/chat/completions", json=BODY,
                             headers={"traceparent": TRACEPARENT, "tracestate": "vendor=abc"})
    body = await resp.json()
    assert resp.status == 200
    spans = spans_of(client, exporter)
    server = next(s for s in spans if s.kind.name == "SERVER")
    upstream = next(s for s in spans if s.kind.name == "CLIENT")
    choose = next(s for s in spans if s.name == "kvroute.choose_worker")
    assert server.name == upstream.name == "chat m"
    assert server.context.trace_id == int(PARENT_TRACE, 16)  # the caller's trace continues
    assert server.parent.span_id == int("00f067aa0ba902b7", 16)
    assert upstream.parent.span_id == server.context.span_id and choose.parent.span_id == server.context.span_id
    a = server.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "m"
    assert a["gen_ai.response.model"] == "m" and a["gen_ai.request.max_tokens"] == 5
    assert a["gen_ai.request.temperature"] == 0.5
    assert a["gen_ai.usage.input_tokens"] == body["usage"]["prompt_tokens"] == 11
    assert a["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"] == 3
    assert a["kvroute.cached_tokens"] == 5 and a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["kvroute.worker"] == url(worker) and a["http.response.status_code"] == 200
    assert "error.type" not in a
    assert upstream.attributes["server.port"] == worker.port
    assert [e.name for e in upstream.events] == ["kvroute.first_token"]
    # The worker got this try's span as its parent, and the caller's tracestate.
    seen = worker.app[SEEN_HEADERS][-1]
    assert seen["traceparent"] == f"00-{PARENT_TRACE}-{upstream.context.span_id:016x}-01"
    assert seen["tracestate"] == "vendor=abc"


async def test_an_unsampled_request_makes_no_spans_and_the_worker_continues_its_trace(aiohttp_client, worker):
    exporter = InMemorySpanExporter()
    client = await router(aiohttp_client, [url(worker)], exporter=exporter,
                          telemetry={"traces": {"sampler": "parentbased_traceidratio", "sample_ratio": 0}})
    unsampled = f"00-{PARENT_TRACE}-00f067aa0ba902b7-00"
    for headers in ({}, {"traceparent": unsampled}, {"traceparent": TRACEPARENT}):
        assert (await client.post("/v1/chat/completions", json=BODY, headers=headers)).status == 200
    seen = [h.get("traceparent", "") for h in worker.app[SEEN_HEADERS][-3:]]
    for tp in seen[:2]:  # a trace context with the sampled flag clear (0x02: a random trace id)
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", tp) and int(tp[-2:], 16) & 1 == 0, tp
    assert seen[1].startswith(f"00-{PARENT_TRACE}-") and seen[1] != unsampled  # the router's span id
    spans = spans_of(client, exporter)
    # Only the sampled caller's request is traced, all of it: server, worker choice, upstream try.
    assert {s.context.trace_id for s in spans} == {int(PARENT_TRACE, 16)}
    assert sorted(s.kind.name for s in spans) == ["CLIENT", "INTERNAL", "SERVER"]
    assert seen[2] == f"00-{PARENT_TRACE}-{next(s for s in spans if s.kind.name == 'CLIENT').context.span_id:016x}-01"


async def test_without_tracing_the_trace_context_passes_through_untouched(aiohttp_client, worker):
    client = await router(aiohttp_client, [url(worker)])
    assert client.app[keys.TELEMETRY].tracing is None
    resp = await client.post("/v1/chat/completions", json=BODY,
                             headers={"traceparent": TRACEPARENT, "tracestate": "vendor=abc"})
    assert resp.status == 200
    assert worker.app[SEEN_HEADERS][-1] == {"traceparent": TRACEPARENT, "tracestate": "vendor=abc",
                                            "x-request-id": resp.headers["x-request-id"]}


async def test_a_retried_request_shows_each_try_as_a_client_span(aiohttp_client, aiohttp_server, worker):
    bad = await aiohttp_server(fake_worker("bad"))
    bad.app[FAULTS]["status"] = 503
    exporter = InMemorySpanExporter()
    client = await router(aiohttp_client, [url(bad), url(worker)], exporter=exporter)
    for _ in range(2):  # round robin: one of the two starts on the failing worker
        assert (await client.post("/v1/chat/completions", json=BODY)).status == 200
    spans = spans_of(client, exporter)
    servers = [s for s in spans if s.kind.name == "SERVER"]
    retried = next(s for s in servers if s.attributes["kvroute.tries"] == 2)
    tries = sorted((s for s in spans if s.kind.name == "CLIENT" and s.parent.span_id == retried.context.span_id),
                   key=lambda s: s.attributes["kvroute.try"])
    assert [t.attributes["kvroute.worker"] for t in tries] == [url(bad), url(worker)]
    assert tries[0].attributes["error.type"] and tries[0].status.status_code.name == "ERROR"
    assert "error.type" not in tries[1].attributes


async def test_a_failed_request_carries_error_type(aiohttp_client, aiohttp_server):
    bad = await aiohttp_server(fake_worker("bad"))
    bad.app[FAULTS]["status"] = 500
    exporter = InMemorySpanExporter()
    client = await router(aiohttp_client, [url(bad)], exporter=exporter)
    assert (await client.post("/v1/chat/completions", json=BODY)).status == 500
    server = next(s for s in spans_of(client, exporter) if s.kind.name == "SERVER")
    assert server.attributes["error.type"] and server.attributes["http.response.status_code"] == 500


async def test_prompt_logs_are_redacted_and_carry_the_request_facts(aiohttp_client, worker, tmp_path):
    path = tmp_path / "prompts.jsonl"
    exporter = InMemorySpanExporter()
    client = await router(aiohttp_client, [url(worker)], exporter=exporter,
                          telemetry={"prompt_logs": {"enabled": True, "file": {"path": str(path)}, "span": True}},
                          price={"input_per_m": 1.0, "output_per_m": 2.0})
    resp = await client.post("/v1/chat/completions", json=BODY, headers={"traceparent": TRACEPARENT,
                                                                         "x-kvroute-agent": "research",
                                                                         "Authorization": "Bearer sk-secret-key"})
    assert resp.status == 200
    client.app[keys.TELEMETRY].close()  # flush the file
    (line,) = path.read_text().splitlines()
    rec = json.loads(line)
    assert rec["schema"] == 1 and rec["trace_id"] == PARENT_TRACE and rec["model"] == "m"
    assert rec["request"]["messages"][0]["content"] == "Mail me at [EMAIL]"
    assert rec["response"] == {"text": "hi from w1", "finish_reason": "stop"}
    assert rec["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "cached_tokens": 5}
    assert rec["cost_usd"] == pytest.approx((11 * 1.0 + 3 * 2.0) / 1e6)
    assert rec["tags"] == {"agent": "research"} and rec["worker"] == url(worker) and rec["status"] == 200
    assert rec["request_id"] == resp.headers["x-request-id"]
    assert "sk-secret-key" not in line
    server = next(s for s in exporter.get_finished_spans() if s.kind.name == "SERVER")
    assert server.attributes["kvroute.request_id"] == resp.headers["x-request-id"]
    assert "[EMAIL]" in server.attributes["gen_ai.input.messages"]
    assert "hi from w1" in server.attributes["gen_ai.output.messages"]


async def test_with_prompt_logs_off_no_prompt_text_reaches_a_log_span_or_file(aiohttp_client, worker, tmp_path,
                                                                               caplog):
    exporter = InMemorySpanExporter()
    client = await router(aiohttp_client, [url(worker)], exporter=exporter)
    secret = "the-unique-prompt-text-4711"
    with caplog.at_level("DEBUG"):
        body = {**BODY, "messages": [{"role": "user", "content": secret}]}
        assert (await client.post("/v1/chat/completions", json=body)).status == 200
        assert (await client.post("/v1/chat/completions", json={**body, "stream": True})).status == 200
    assert client.app[keys.TELEMETRY].prompts is None
    spans = spans_of(client, exporter)
    assert spans and all(secret not in repr(dict(s.attributes)) + repr(s.events) for s in spans)
    assert secret not in caplog.text
    assert not list(tmp_path.iterdir())


async def test_prompt_logs_per_model_and_sampling(aiohttp_client, worker, tmp_path):
    path = tmp_path / "p.jsonl"
    client = await router(aiohttp_client, [url(worker)],
                          telemetry={"prompt_logs": {"models": ["other"], "file": {"path": str(path)}}})
    assert (await client.post("/v1/chat/completions", json=BODY)).status == 200
    client.app[keys.TELEMETRY].close()
    assert not path.exists() or path.read_text() == ""  # model 'm' did not opt in


def test_rotation_keeps_the_configured_number_of_files(tmp_path):
    cfg = parse_telemetry({"prompt_logs": {"enabled": True, "file": {"path": str(tmp_path / "p.jsonl"),
                                                                     "max_bytes": 200, "backups": 2}}})
    log = PromptLog(cfg.prompt_logs)
    for i in range(20):
        log.write({"i": i, "pad": "x" * 80})
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["p.jsonl", "p.jsonl.1", "p.jsonl.2"]
    kept = [json.loads(line)["i"] for n in names for line in (tmp_path / n).read_text().splitlines()]
    assert 19 in kept and 0 not in kept  # the newest stay, the oldest rotated away


def test_sampling_rate_and_tenant_opt_in():
    cfg = parse_telemetry({"prompt_logs": {"tenants": ["acme"], "sample_rate": 0.25, "span": True}}).prompt_logs
    draws = iter([0.1, 0.9, 0.2, 0.3])
    log = PromptLog(cfg, rng=lambda: next(draws))
    assert not log.sampled("m", tenants_known=False)  # a tenant opt-in needs governance
    assert [log.sampled("m", tenants_known=True) for _ in range(4)] == [True, False, True, False]
    assert log.wanted("m", "acme") and not log.wanted("m", "globex")


def test_redaction_defaults_and_custom_rules():
    cfg = parse_telemetry({"prompt_logs": {"enabled": True, "span": True, "max_chars": 200,
                                           "redact": {"rules": [{"pattern": r"ACME-\d+", "replace": "[ID]"}]}}})
    log = PromptLog(cfg.prompt_logs)
    text = ("mail a.b@c.io, key sk-abcdefghijklmnop1234, Bearer abcdefghijklmnopqrstu, card 4111 1111 1111 1111, "
            "order 1234567890123, AKIAABCDEFGHIJKLMNOP, ticket ACME-42")
    out = log.redact(text)
    assert out == ("mail [EMAIL], key [API_KEY], Bearer [API_KEY], card [CARD], order 1234567890123, [API_KEY], "
                   "ticket [ID]")
    assert log.redact("x" * 300).endswith("[cut]") and len(log.redact("x" * 300)) < 220
    assert PromptLog(parse_telemetry({"prompt_logs": {"enabled": True, "span": True,
                                                      "redact": {"defaults": False}}}).prompt_logs
                     ).redact("a.b@c.io") == "a.b@c.io"


@pytest.mark.parametrize("raw, key", [
    ({"traces": {"protocol": "thrift"}}, "telemetry.traces.protocol"),
    ({"traces": {"endpoint": "collector:4318"}}, "telemetry.traces.endpoint"),
    ({"traces": {"sample_ratio": 2}}, "telemetry.traces.sample_ratio"),
    ({"traces": {"sampler": "sometimes"}}, "telemetry.traces.sampler"),
    ({"prompt_logs": {"enabled": True}}, "telemetry.prompt_logs"),
    ({"prompt_logs": {"span": True, "redact": {"rules": [{"pattern": "("}]}}}, "telemetry.prompt_logs.redact"),
    ({"prompt_logs": {"sample_rate": 1.5}}, "telemetry.prompt_logs.sample_rate"),
    ({"logs": {}}, "telemetry"),
])
def test_bad_telemetry_config_names_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        parse_telemetry(raw)
    assert re.search(re.escape(key), str(err.value))


def test_an_otlp_endpoint_alone_turns_tracing_on_as_in_the_otel_sdks():
    cfg = parse_telemetry({}).traces
    assert not tracing_on(cfg, {})
    assert tracing_on(cfg, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert tracing_on(cfg, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert not tracing_on(cfg, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"})
    assert not tracing_on(cfg, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"})
    assert tracing_on(parse_telemetry({"traces": {"endpoint": "http://c:4318"}}).traces, {})
    assert not tracing_on(parse_telemetry({"traces": {"enabled": False}}).traces,
                          {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})


async def test_per_request_histograms_of_tokens_and_cost(aiohttp_client, worker):
    client = await router(aiohttp_client, [url(worker)], price={"input_per_m": 1.0, "output_per_m": 2.0})
    for _ in range(3):
        assert (await client.post("/v1/chat/completions", json=BODY)).status == 200
    text = (await (await client.get("/metrics")).read()).decode()
    labels = 'agent="none",feature="none",model="m",tier=""'
    assert f"kvroute_request_prompt_tokens_count{{{labels}}} 3.0" in text
    assert f"kvroute_request_prompt_tokens_sum{{{labels}}} 33.0" in text
    assert f"kvroute_request_completion_tokens_sum{{{labels}}} 9.0" in text
    m = re.search(rf"kvroute_request_cost_usd_sum{{{re.escape(labels)}}} ([0-9.e-]+)", text)
    assert m and float(m.group(1)) == pytest.approx(3 * 17e-6)


async def test_prompt_logs_for_one_tenant_only(aiohttp_client, worker, tmp_path):
    path = tmp_path / "p.jsonl"
    cfg = config_from_dict({
        "models": [{"name": "m", "workers": [url(worker)]}], "health": {"interval_s": 60},
        "governance": {"tenants": [{"name": "acme", "keys": ["sk-acme-0123456789"]},
                                   {"name": "globex", "keys": ["sk-globex-0123456789"]}]},
        "telemetry": {"prompt_logs": {"tenants": ["acme"], "file": {"path": str(path)}}}})
    client = await aiohttp_client(create_app(cfg))
    for key in ("sk-acme-0123456789", "sk-globex-0123456789"):
        resp = await client.post("/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"})
        assert resp.status == 200
    client.app[keys.TELEMETRY].close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["tenant"] for r in lines] == ["acme"]
    assert "sk-acme" not in path.read_text()


def test_the_exporter_follows_the_protocol():
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    from kvroute.router.telemetry.tracing import _exporter

    http = _exporter(parse_telemetry({"traces": {"endpoint": "http://c:4318"}}).traces, {})
    assert isinstance(http, Http) and http._endpoint == "http://c:4318/v1/traces"
    grpc = _exporter(parse_telemetry({"traces": {"endpoint": "c:4317", "protocol": "grpc"}}).traces, {})
    assert isinstance(grpc, Grpc)
    grpc.shutdown()
    from_env = _exporter(parse_telemetry({}).traces, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert isinstance(from_env, Grpc)
    from_env.shutdown()


async def test_a_cache_hit_shows_on_the_span(aiohttp_client, worker):
    exporter = InMemorySpanExporter()
    cfg = config_from_dict({"models": [{"name": "m", "workers": [url(worker)]}], "health": {"interval_s": 60},
                            "cache": {"exact": {}}})
    client = await aiohttp_client(create_app(cfg, span_exporter=exporter))
    body = {**BODY, "temperature": 0}
    for _ in range(2):
        assert (await client.post("/v1/chat/completions", json=body)).status == 200
    servers = [s for s in spans_of(client, exporter) if s.kind.name == "SERVER"]
    assert [s.attributes.get("kvroute.cache.hit") for s in servers] == [None, "exact"]
    assert servers[1].attributes["kvroute.tries"] == 0


async def test_a_telemetry_fault_never_costs_the_request(aiohttp_client, worker, monkeypatch, caplog):
    from kvroute.router.telemetry import Telemetry

    def broken(self, *args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(Telemetry, "end", broken)
    client = await router(aiohttp_client, [url(worker)])
    resp = await client.post("/v1/chat/completions", json=BODY)
    assert resp.status == 200 and (await resp.json())["choices"][0]["message"]["content"] == "hi from w1"
    assert "telemetry failed" in caplog.text


def test_a_prompt_log_in_a_missing_folder_is_a_config_error(tmp_path):
    from kvroute.router.secrets import Local

    raw = {"prompt_logs": {"enabled": True, "file": {"path": str(tmp_path / "nowhere" / "p.jsonl")}}}
    with pytest.raises(ConfigError) as err:
        parse_telemetry(raw)
    assert err.value.key == "telemetry.prompt_logs.file.path" and "no such folder" in str(err.value)
    # kvroute config check --skip-local-checks: the folder is on another machine
    assert parse_telemetry(raw, local=Local(check=False)).prompt_logs.file is not None
