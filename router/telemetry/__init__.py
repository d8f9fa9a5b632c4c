"""Observability of each request: OpenTelemetry GenAI spans, prompt logs and the
per-request distributions of tokens and cost.

``Telemetry.begin`` opens a request's ``RequestRecord`` (and its server span, continuing
the caller's ``traceparent``/``tracestate``); the pipeline's stages report into it;
``Telemetry.end`` closes it: span attributes, histograms, one prompt-log line.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kvroute.router.governance.budgets import Rates
from kvroute.router.governance.identity import trace_id as w3c_trace_id
from kvroute.router.requests import (
    CHAT,
    CHAT_BATCH,
    CLASSIFY,
    COHERE_CHAT,
    COHERE_EMBED,
    COMPLETION,
    COUNT_TOKENS,
    DETOKENIZE,
    EMBEDDING,
    GENERATE,
    GENERATIVE_SCORING,
    MESSAGES,
    POOL,
    RENDERED,
    REQUEST_ID,
    RERANK,
    RESPONSES,
    SCORE,
    TOKENIZE,
    ParsedRequest,
)
from kvroute.router.telemetry.config import TelemetryConfig
from kvroute.router.telemetry.jsonl import JsonLines
from kvroute.router.telemetry.promptlog import SCHEMA, PromptLog
from kvroute.router.telemetry.record import Capture, RequestRecord
from kvroute.router.telemetry.tracing import Tracing

if TYPE_CHECKING:
    from kvroute.router.metrics import RouterMetrics

__all__ = ["Capture", "RequestRecord", "Telemetry"]

TAGS = ("agent", "task", "feature", "user")
# gen_ai.operation.name, as OpenTelemetry's GenAI conventions spell each kind (the token and
# render APIs, which the conventions do not name: kvroute's)
_OPERATIONS = {CHAT: "chat", COMPLETION: "text_completion", EMBEDDING: "embeddings", RESPONSES: "chat",
               MESSAGES: "chat", COUNT_TOKENS: "count_tokens", TOKENIZE: "tokenize", DETOKENIZE: "detokenize",
               SCORE: "score", RERANK: "rerank", CLASSIFY: "classify", POOL: "pooling", GENERATE: "generate",
               CHAT_BATCH: "chat", COHERE_EMBED: "embeddings", GENERATIVE_SCORING: "generative_scoring",
               COHERE_CHAT: "chat",
               **dict.fromkeys(RENDERED, "render")}


class Telemetry:
    def __init__(self, cfg: TelemetryConfig, metrics: RouterMetrics, *,
                 tag_values: dict[str, tuple[str, ...]] | None = None, governed: bool = False,
                 span_exporter: Any = None):
        """``span_exporter``: an OpenTelemetry span exporter to use instead of OTLP's (tests)."""
        self.cfg = cfg
        self.metrics = metrics
        self.tag_values = tag_values or {}
        self.governed = governed
        self._span_exporter = span_exporter
        self.tracing: Tracing | None = None
        self.prompts: PromptLog | None = None
        self.access: JsonLines | None = None
        # (model, tier, agent, feature) -> the three per-request histograms' series, bound
        # once (labels() costs more than observe); bounded by the models and the tag allow-list
        self._per_request: dict[tuple[str, str, str, str], tuple[Any, Any, Any]] = {}

    def start(self) -> None:
        """Open the exporter and the prompt-log file (the app's start-up)."""
        self.tracing = Tracing.create(self.cfg.traces, exporter=self._span_exporter)
        if self.cfg.prompt_logs.on:
            self.prompts = PromptLog(self.cfg.prompt_logs)
        if self.cfg.access_log.enabled:
            self.access = JsonLines(self.cfg.access_log.file, "kvroute.access")

    def begin(self, req: ParsedRequest) -> RequestRecord:
        operation = _OPERATIONS[req.kind]
        capture = self.prompts is not None and self.prompts.sampled(req.model, tenants_known=self.governed)
        span = None
        if self.tracing is not None:
            body = req.body
            attrs: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.request.model": req.model,
                                     "gen_ai.provider.name": "kvroute"}
            for key, attr in (("max_tokens", "gen_ai.request.max_tokens"),
                              ("temperature", "gen_ai.request.temperature"), ("top_p", "gen_ai.request.top_p"),
                              ("seed", "gen_ai.request.seed")):
                value = body.get("max_completion_tokens") if key == "max_tokens" and body.get(
                    "max_completion_tokens") is not None else body.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    attrs[attr] = value
            parent = self.tracing.extract(req.headers)
            span = self.tracing.start(f"{operation} {req.model}", parent, kind="server", attributes=attrs)
            if span.get_span_context().is_valid:
                # Governance and the spend log see this trace's id (a new one when the caller sent none).
                req.headers.update(self.tracing.inject(span))  # type: ignore[attr-defined]
        return RequestRecord(req=req, operation=operation, tracing=self.tracing, span=span, capture=capture)

    def end(self, rec: RequestRecord, status: int, error: BaseException | None = None) -> None:
        prompt, cached, completion, usd = _totals(rec)
        final = rec.tries[-1] if rec.tries else None
        tier = final.route.cfg.tier if final is not None else None
        tags = _tags(rec)
        error_type = _error_type(error, final)
        if final is not None:
            labels = (rec.req.model, tier or "", self._label("agent", tags.get("agent")),
                      self._label("feature", tags.get("feature")))
            bound = self._per_request.get(labels)
            if bound is None:
                m = self.metrics
                bound = self._per_request[labels] = (m.request_prompt_tokens.labels(*labels),
                                                     m.request_completion_tokens.labels(*labels),
                                                     m.request_cost_usd.labels(*labels))
            bound[0].observe(prompt)
            bound[1].observe(completion)
            bound[2].observe(usd)
        if rec.span is not None:
            self._end_span(rec, status, error_type, final, tags, (prompt, cached, completion, usd))
        if rec.capture and self.prompts is not None and self.prompts.wanted(rec.req.model, tags.get("tenant")):
            self.prompts.write(self._log_record(rec, status, error_type, final, tags,
                                                (prompt, cached, completion, usd)))

    def log_access(self, method: str, path: str, status: int, started: float, request_id: str | None,
                   rec: RequestRecord | None, error_code: str | None, remote: str | None,
                   headers: Mapping[str, str]) -> None:
        """One access-log line for an API request (``started``: its perf_counter at arrival).
        ``rec``: what the request path recorded, absent when it stopped before (bad input, a
        refusal at admission); ``error_code``: the code of the error it answered with;
        ``remote`` and ``headers``: who sent it (the peer, and what proxies and the client say)."""
        if self.access is None:
            return
        entry: dict[str, Any] = {"time": round(time.time(), 3), "request_id": request_id, "method": method,
                                 "path": path, "status": status,
                                 "duration_ms": round((time.perf_counter() - started) * 1e3, 3),
                                 "remote": remote, "forwarded_for": _capped(headers.get("X-Forwarded-For")),
                                 "user_agent": _capped(headers.get("User-Agent"))}
        if rec is not None:
            final = rec.tries[-1] if rec.tries else None
            prompt, cached, completion, usd = _totals(rec)
            tags = _tags(rec)
            entry.update({"model": rec.req.model, "stream": rec.req.stream,
                          "tier": final.route.cfg.tier if final is not None else None,
                          "worker": final.worker.url if final is not None else None, "tries": len(rec.tries),
                          "ttft_ms": round((final.first_token_at - started) * 1e3, 3)
                          if final is not None and final.first_token_at is not None and rec.req.stream else None,
                          "prompt_tokens": prompt, "completion_tokens": completion, "cached_tokens": cached,
                          "cost_usd": round(usd, 9), "cache": rec.cache_hit, "tenant": tags.get("tenant"),
                          "trace_id": w3c_trace_id(rec.req.headers.get("traceparent"))})
            if error_code is None and final is not None and final.status != "ok":
                error_code = final.status  # e.g. a stream cut after its first byte, or a client that left
        entry["error"] = error_code
        self.access.write(entry)

    def _label(self, tag: str, value: str | None) -> str:
        if not value:
            return "none"
        allowed = self.tag_values.get(tag)
        return value if allowed and value in allowed else "other"

    def _end_span(self, rec: RequestRecord, status: int, error_type: str | None, final: Any, tags: dict,
                  totals: tuple[int, int, int, float]) -> None:
        from opentelemetry.trace import StatusCode

        span = rec.span
        assert span is not None
        prompt, cached, completion, usd = totals
        attrs: dict[str, Any] = {"http.response.status_code": status, "kvroute.cost_usd": usd,
                                 "kvroute.tries": len(rec.tries), "kvroute.decision_ms": rec.decision_s * 1e3}
        if (rid := rec.req.headers.get(REQUEST_ID)) is not None:
            attrs["kvroute.request_id"] = rid
        if final is not None:
            route = final.route
            attrs.update({"gen_ai.response.model": route.cfg.served_name, "gen_ai.usage.input_tokens": prompt,
                          "gen_ai.usage.output_tokens": completion, "kvroute.cached_tokens": cached,
                          "kvroute.predicted_cached_tokens": final.predicted_cached, "kvroute.worker": final.worker.url,
                          "kvroute.index_mode": route.index_kind, "kvroute.policy": route.cfg.policy})
            if route.cfg.tier:
                attrs["kvroute.tier"] = route.cfg.tier
            if final.capture is not None and final.capture.finish_reasons:
                attrs["gen_ai.response.finish_reasons"] = final.capture.finish_reasons
        if rec.cache_hit is not None:
            attrs["kvroute.cache.hit"] = rec.cache_hit
        if rec.score is not None:
            attrs["kvroute.classifier.score"] = rec.score
        if rec.tier_source:
            attrs["kvroute.tier.source"] = rec.tier_source
        for name, value in tags.items():
            attrs[f"kvroute.{name}"] = value
        if rec.grant is not None:
            g = rec.grant
            outcome = "downgraded" if rec.downgraded else ("cut" if g.cut is not None else "admitted")
            attrs["kvroute.budget.outcome"] = outcome
            if g.binding is not None:
                attrs["kvroute.budget.binding"] = g.binding.name
        if rec.escalated is not None:
            attrs["kvroute.cascade.escalated"] = rec.escalated
            if rec.cascade_from is not None:
                attrs["kvroute.cascade.from"] = rec.cascade_from
                attrs["kvroute.cascade.to"] = rec.cascade_to or ""
            if rec.confidence is not None:
                attrs["kvroute.cascade.confidence"] = rec.confidence
        if rec.capture and self.prompts is not None and self.prompts.cfg.span \
                and self.prompts.wanted(rec.req.model, tags.get("tenant")):
            attrs["gen_ai.input.messages"] = _json(_input_messages(self.prompts, rec.req))
            attrs["gen_ai.output.messages"] = _json(_output_messages(self.prompts, final))
        if error_type is not None:
            attrs["error.type"] = error_type
            span.set_status(StatusCode.ERROR, error_type)
        span.set_attributes(attrs)
        span.end()

    def _log_record(self, rec: RequestRecord, status: int, error_type: str | None, final: Any, tags: dict,
                    totals: tuple[int, int, int, float]) -> dict:
        prompts = self.prompts
        assert prompts is not None
        prompt, cached, completion, usd = totals
        ctx = rec.span.get_span_context() if rec.span is not None else None
        trace_id = format(ctx.trace_id, "032x") if ctx is not None and ctx.is_valid else \
            w3c_trace_id(rec.req.headers.get("traceparent"))
        answer = final.capture if final is not None else None
        return {
            "schema": SCHEMA, "time": time.time(), "trace_id": trace_id,
            "span_id": format(ctx.span_id, "016x") if ctx is not None and ctx.is_valid else None,
            "request_id": rec.req.headers.get(REQUEST_ID),
            "model": rec.req.model, "operation": rec.operation,
            "tier": final.route.cfg.tier if final is not None else None,
            "upstream_model": final.route.cfg.served_name if final is not None else None,
            "worker": final.worker.url if final is not None else None,
            "tenant": tags.pop("tenant", None), "tags": tags,
            "request": prompts.request_part(rec.req.prompt_view),
            "response": None if answer is None else {
                "text": prompts.redact(answer.answer),
                "finish_reason": answer.finish_reasons[-1] if answer.finish_reasons else None,
                **({"tool_calls": prompts.redact_value(answer.tool_calls)} if answer.tool_calls else {})},
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "cached_tokens": cached}
            if final is not None else None,
            "cost_usd": round(usd, 9),
            "classifier_score": rec.score,
            "cascade": None if rec.escalated is None else {
                "tiers": [d.route.cfg.tier for d in rec.tries if d.status == "ok"] or None,
                "escalated": rec.escalated, "kept": final.route.cfg.tier if final is not None else None,
                "confidence": rec.confidence},
            "cache": rec.cache_hit,
            "status": status, "error_type": error_type,
        }

    def close(self) -> None:
        """Flush spans, prompt and access logs (blocking: run it off the loop)."""
        if self.tracing is not None:
            self.tracing.shutdown()
            self.tracing = None
        if self.prompts is not None:
            self.prompts.close()
            self.prompts = None
        if self.access is not None:
            self.access.close()
            self.access = None


def _totals(rec: RequestRecord) -> tuple[int, int, int, float]:
    """Prompt, cached and completion tokens, and cost, summed over the request's tries."""
    prompt = cached = completion = 0
    usd = 0.0
    for d in rec.tries:
        u = d.usage if isinstance(d.usage, dict) else {}
        p, c = _int(u.get("prompt_tokens")), _int(u.get("completion_tokens"))
        details = u.get("prompt_tokens_details")
        k = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
        prompt, cached, completion = prompt + p, cached + k, completion + c
        usd += Rates.of(d.route.cfg.price).cost(p, k, c)
    return prompt, cached, completion, usd


def _tags(rec: RequestRecord) -> dict[str, str]:
    """tenant, agent, task, feature, user, session: from the grant when governed, else the headers."""
    if rec.grant is not None:
        a = rec.grant.attrs
        pairs = {"tenant": a.tenant, "agent": a.agent, "task": a.task, "feature": a.feature, "user": a.user,
                 "session": a.session}
    else:
        h = rec.req.headers
        pairs = {t: h.get(f"x-kvroute-{t}") for t in TAGS}
        pairs["session"] = h.get("x-kvroute-session")
    return {k: v[:128] for k, v in pairs.items() if v}


def _error_type(error: BaseException | None, final: Any) -> str | None:
    if error is not None:
        return getattr(error, "code", None) or getattr(error, "type", None) or type(error).__name__
    if final is not None and final.status not in ("ok",):
        return final.status
    return None


def _input_messages(prompts: PromptLog, req: ParsedRequest) -> list:
    """GenAI convention: [{role, parts: [{type: text, content}]}]."""
    part = prompts.request_part(req.prompt_view)
    if "messages" in part:
        out = []
        for m in part["messages"]:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            text = content if isinstance(content, str) else _json(content)
            out.append({"role": m.get("role"), "parts": [{"type": "text", "content": text}]})
        return out
    prompt = part.get("prompt")
    return [{"role": "user", "parts": [{"type": "text", "content": prompt if isinstance(prompt, str)
                                        else _json(prompt)}]}]


def _output_messages(prompts: PromptLog, final: Any) -> list:
    cap = final.capture if final is not None else None
    if cap is None:
        return []
    return [{"role": "assistant", "parts": [{"type": "text", "content": prompts.redact(cap.answer)}],
             "finish_reason": cap.finish_reasons[-1] if cap.finish_reasons else None}]


def _json(value: Any) -> str:
    import orjson

    return orjson.dumps(value).decode()


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _capped(value: str | None, limit: int = 256) -> str | None:
    """A client-sent header for the access log: its line stays short whatever was sent."""
    return value if value is None or len(value) <= limit else value[:limit] + "..."
