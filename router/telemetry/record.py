"""One request's telemetry: its server span, what each stage decided, and its answer.

The request path fills a ``RequestRecord`` as it goes (tier, grant, worker choice, each
upstream try); at the end ``Telemetry.end`` turns it into span attributes, the
per-request histograms and a prompt-log line. Spans follow the OpenTelemetry GenAI
semantic conventions (``gen_ai.*``); kvroute's own attributes sit under ``kvroute.*``.

Span tree of one request::

    chat {model}                      SERVER  gen_ai.*, kvroute.* (routing, governance, cascade)
    ├── kvroute.choose_tier           INTERNAL  tiered models: classifier score, tier
    ├── kvroute.choose_worker         INTERNAL  one per try: worker, policy, decision time
    └── chat {upstream model}         CLIENT    one per upstream try (retries, cascade tiers);
                                                event kvroute.first_token
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from kvroute.router.governance.grant import Grant
    from kvroute.router.proxy import Dispatch
    from kvroute.router.requests import ParsedRequest
    from kvroute.router.telemetry.tracing import Tracing


@dataclass
class Capture:
    """What a worker answered, gathered from its response or stream: the text (prompt
    logs) and the finish reasons (spans). ``text=False`` keeps only the finish reasons."""

    text: bool
    parts: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    tool_calls: list[Any] = field(default_factory=list)

    def whole(self, body: Any) -> None:
        if isinstance(body, dict) and body.get("object") == "response":
            self._response(body)
            return
        if isinstance(body, dict) and body.get("type") == "message":
            self._message(body.get("content"), body.get("stop_reason"))
            return
        for choice in _choices(body):
            self._take(choice, "message")

    def event(self, data: bytes) -> None:
        """One SSE event (``data: {...}``; a Responses stream's ``event: ...`` line first)."""
        if data.startswith(_RESPONSE_END):  # the whole response, at the end of its stream
            try:
                body = orjson.loads(data[data.index(b"data: ") + 6:]).get("response")
            except (ValueError, AttributeError):
                return
            if isinstance(body, dict):
                self._response(body)
            return
        if data.startswith(_MESSAGE_EVENTS):  # an Anthropic stream: text deltas, then the stop reason
            try:
                event = orjson.loads(data[data.index(b"data: ") + 6:])
            except ValueError:
                return
            delta = event.get("delta") if isinstance(event, dict) else None
            if not isinstance(delta, dict):
                return
            if event.get("type") == "message_delta":
                self._message(None, delta.get("stop_reason"))
            elif self.text and isinstance(delta.get("text"), str):
                self.parts.append(delta["text"])
            return
        if not self.text and b'"finish_reason":"' not in data:
            return  # spans only: a chunk without a finish reason has nothing for them
        if not data.startswith(b"data: {"):
            return
        try:
            chunk = orjson.loads(data[6:])
        except orjson.JSONDecodeError:
            return
        for choice in _choices(chunk):
            self._take(choice, "delta")

    def _take(self, choice: dict, part: str) -> None:
        """One choice: ``part`` is ``message`` (a whole chat answer) or ``delta`` (a chat
        chunk); a completion's choice carries ``text`` instead."""
        if isinstance(choice.get("finish_reason"), str):
            self.finish_reasons.append(choice["finish_reason"])
        if not self.text:
            return
        msg = choice.get(part)
        content = msg.get("content") if isinstance(msg, dict) else choice.get("text")
        if isinstance(content, str):
            self.parts.append(content)
        if isinstance(msg, dict) and msg.get("tool_calls"):
            self.tool_calls.extend(msg["tool_calls"])

    def _response(self, body: dict) -> None:
        """A Responses answer: its status as a chat finish reason, its text and function calls."""
        details = body.get("incomplete_details")
        if body.get("status") == "completed":
            self.finish_reasons.append("stop")
        elif isinstance(details, dict) and details.get("reason") == "max_output_tokens":
            self.finish_reasons.append("length")
        elif isinstance(body.get("status"), str):
            self.finish_reasons.append(body["status"])
        if not self.text:
            return
        for item in body.get("output") or ():
            if not isinstance(item, dict):
                continue
            if item.get("type") == "message":
                self.parts.extend(p["text"] for p in item.get("content") or ()
                                  if isinstance(p, dict) and isinstance(p.get("text"), str))
            elif item.get("type") == "function_call":
                self.tool_calls.append({"id": item.get("call_id"), "type": "function",
                                        "function": {"name": item.get("name"), "arguments": item.get("arguments")}})

    def _message(self, blocks: Any, stop_reason: Any) -> None:
        """An Anthropic answer's content blocks (None: streamed, taken from its deltas) and
        stop reason, as a chat finish reason."""
        if isinstance(stop_reason, str):
            self.finish_reasons.append(_STOP_REASONS.get(stop_reason, stop_reason))
        if not self.text or not isinstance(blocks, list):
            return
        for b in blocks:
            if not isinstance(b, dict):
                continue
            if b.get("type") == "text" and isinstance(b.get("text"), str):
                self.parts.append(b["text"])
            elif b.get("type") == "tool_use":
                self.tool_calls.append({"id": b.get("id"), "type": "function", "function": {
                    "name": b.get("name"), "arguments": orjson.dumps(b.get("input")).decode()}})

    @property
    def answer(self) -> str:
        return "".join(self.parts)


_RESPONSE_END = (b"event: response.completed", b"event: response.incomplete", b"event: response.failed")
_MESSAGE_EVENTS = (b"event: content_block_delta", b"event: message_delta")
_STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}


def _choices(body: Any) -> list[dict]:
    choices = body.get("choices") if isinstance(body, dict) else None
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


@dataclass
class RequestRecord:
    req: ParsedRequest
    operation: str  # gen_ai.operation.name: chat, text_completion or embeddings
    tracing: Tracing | None
    span: Span | None  # the server span; None when tracing is off
    capture: bool  # gather each try's answer text (prompt logs)
    started: float = field(default_factory=time.perf_counter)
    score: float | None = None  # the tier classifier's score
    tier_source: str | None = None  # header, routes, classifier, band, cascade or previous_response
    grant: Grant | None = None  # the first try's (tenant, tags, budgets)
    downgraded: bool = False
    tries: list[Dispatch] = field(default_factory=list)
    escalated: bool | None = None  # cascade models only
    cascade_from: str | None = None
    cascade_to: str | None = None
    confidence: float | None = None  # the answer scorer's confidence in the cheap answer
    decision_s: float = 0.0  # the policies' time choosing workers
    cache_hit: str | None = None  # the response cache answered: exact or semantic

    # ---- what the stages report --------------------------------------------------------

    def on_tier(self, tier: str | None, score: float | None, source: str) -> None:
        self.score = score if score is not None else self.score
        self.tier_source = source
        if self.span is not None and self.tracing is not None and self.span.is_recording():
            attrs: dict[str, Any] = {"kvroute.tier": tier or "", "kvroute.tier.source": source}
            if score is not None:
                attrs["kvroute.classifier.score"] = score
            now = time.time_ns()
            self.tracing.start("kvroute.choose_tier", self.span, attributes=attrs, start_time=now).end(now)

    def on_grant(self, grant: Grant, downgraded: bool) -> None:
        if self.grant is None:
            self.grant = grant
        self.downgraded = self.downgraded or downgraded

    @contextlib.contextmanager
    def choosing_worker(self, model: str, policy: str, index: str) -> Iterator[dict[str, Any]]:
        """Wraps one worker choice; the caller fills the yielded dict (worker, decision time)."""
        out: dict[str, Any] = {}
        start = time.time_ns()
        yield out
        self.decision_s += out.get("decision_s", 0.0)
        if self.span is not None and self.tracing is not None and self.span.is_recording():
            self.tracing.start("kvroute.choose_worker", self.span, start_time=start, attributes={
                "kvroute.model": model, "kvroute.policy": policy, "kvroute.index_mode": index,
                "kvroute.worker": out.get("worker", ""), "kvroute.candidates": out.get("candidates", 0),
                "kvroute.decision_ms": out.get("decision_s", 0.0) * 1e3}).end()

    @contextlib.contextmanager
    def upstream(self, d: Dispatch) -> Iterator[None]:
        """One upstream try: a client span around it, whose context the worker receives."""
        self.tries.append(d)
        if self.capture or self.span is not None:
            d.capture = Capture(text=self.capture)
        if self.span is None or self.tracing is None:
            yield
            return
        if not self.span.is_recording():
            # An unsampled server span's children would be unsampled too (every sampler
            # kvroute offers decides alike within a trace), so none is made: the worker
            # continues the trace, unsampled, under the server span, whose context
            # Telemetry.begin put in the request's headers (passed on as they are).
            yield
            return
        from opentelemetry.trace import StatusCode

        name = d.route.cfg.served_name
        url = d.worker.url.split("://", 1)[-1]
        host, _, port = url.partition(":")
        span = self.tracing.start(f"{self.operation} {name}", self.span, kind="client", attributes={
            "gen_ai.operation.name": self.operation, "gen_ai.provider.name": "vllm", "gen_ai.request.model": name,
            "server.address": host, "server.port": int(port.split("/")[0]) if port[:1].isdigit() else 80,
            "kvroute.worker": d.worker.url, "kvroute.tier": d.route.cfg.tier or "", "kvroute.try": len(self.tries)})
        d.trace_headers = self.tracing.inject(span)
        wall0 = time.time_ns() - int(time.perf_counter() * 1e9)  # perf_counter -> wall clock ns
        try:
            yield
        except BaseException as exc:
            span.set_attribute("error.type", getattr(exc, "code", None) or type(exc).__name__)
            span.set_status(StatusCode.ERROR, str(getattr(exc, "message", exc))[:200])
            raise
        finally:
            if d.first_token_at is not None:
                span.add_event("kvroute.first_token", {"kvroute.ttft_ms": (d.first_token_at - d.started_at) * 1e3},
                               timestamp=wall0 + int(d.first_token_at * 1e9))
            span.set_attributes(_usage_attributes(d.usage))
            span.set_attribute("kvroute.predicted_cached_tokens", d.predicted_cached)
            span.set_attribute("kvroute.status", d.status)
            if d.capture is not None and d.capture.finish_reasons:
                span.set_attribute("gen_ai.response.finish_reasons", d.capture.finish_reasons)
            if d.status not in ("ok", "error"):  # failed or cut after its first byte
                span.set_attribute("error.type", d.status)
            span.end()

    def on_cascade(self, escalated: bool, frm: str | None, to: str | None, confidence: float | None) -> None:
        self.escalated = bool(self.escalated) or escalated
        if frm is not None:  # from: the first tier left; to: the last one reached
            self.cascade_from = self.cascade_from or frm
            self.cascade_to = to
        if confidence is not None and self.confidence is None:
            self.confidence = confidence


def _usage_attributes(usage: Any) -> dict[str, int]:
    if not isinstance(usage, dict):
        return {}
    out = {}
    for key, attr in (("prompt_tokens", "gen_ai.usage.input_tokens"),
                      ("completion_tokens", "gen_ai.usage.output_tokens")):
        if isinstance(usage.get(key), int):
            out[attr] = usage[key]
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        out["kvroute.cached_tokens"] = details["cached_tokens"]
    return out
