"""A ``Grant``: one admitted request's reservation, and the meter on its response.

The proxy sees a grant only as a stream meter (``proxy.StreamMeter``): ``check`` before
each upstream call, ``on_stream_event`` per SSE event and ``on_response`` for a whole
body count what the worker produced; ``cut`` says why a stream had to stop. The
``Governor`` that admitted it decides (``Checks``) and settles it afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from kvroute.router.errors import KvrouteError
from kvroute.router.governance.config import Budget
from kvroute.router.governance.identity import Attribution
from kvroute.router.governance.store import Granted, Slot
from kvroute.router.policies.base import RequestContext
from kvroute.router.requests import COHERE_CHAT, ParsedRequest
from kvroute.router.routes import ModelRoute

# A Cohere chat stream's events that each carry about a token (Cohere's events are named by
# their "type"; a JSON string's quotes are escaped, so no text inside one matches).
_COHERE_TOKEN_EVENTS = (b'"type":"content-delta"', b'"type":"tool-plan-delta"', b'"type":"tool-call-delta"')


class Checks(Protocol):
    """What a grant asks of the governor that admitted it (no I/O)."""

    def stream_check(self, grant: Grant) -> KvrouteError | None: ...

    def check_kill(self, attrs: Attribution, model: str) -> None: ...


@dataclass
class Grant:
    """One admitted request: its reservation, and what its stream has produced so far."""

    checks: Checks
    rid: str
    attrs: Attribution
    model: str
    route: ModelRoute
    req: ParsedRequest
    ctx: RequestContext
    budgets: list[tuple[Budget, Slot]]
    reserved: Granted
    binding: Budget | None  # the budget that limited the completion grant, if one did
    generated: int = 0  # completion tokens seen in the stream
    tool_calls: int = 0  # tool calls seen in the response or stream
    cut: KvrouteError | None = None
    settled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return self.ctx.prompt_tokens

    def check(self) -> None:
        """Before each upstream call: raise if the kill switch now halts this request."""
        self.checks.check_kill(self.attrs, self.route.cfg.name)

    def on_stream_tokens(self, n: int) -> bool:
        """Count ``n`` generated tokens; False when the stream must be cut here."""
        self.generated += n
        if self.cut is None:
            self.cut = self.checks.stream_check(self)
        return self.cut is None

    def on_stream_event(self, data: bytes) -> bool:
        """One SSE event from the worker; False when the stream must be cut before it."""
        if data.startswith(b"event: response."):  # a Responses stream: a delta event is about a token
            name = data[len(b"event: "):data.find(b"\n")].strip()
            if name.endswith(b".delta"):
                return self.on_stream_tokens(1)
            if name == b"response.output_item.added" and b'"type":"function_call"' in data:
                self.tool_calls += 1
            return self.cut is None
        if data.startswith(b"event: content_block_"):  # an Anthropic stream
            if data.startswith(b"event: content_block_delta"):
                return self.on_stream_tokens(1)
            if data.startswith(b"event: content_block_start") and b'"type":"tool_use"' in data:
                self.tool_calls += 1
            return self.cut is None
        if self.req.kind == COHERE_CHAT:
            if any(name in data for name in _COHERE_TOKEN_EVENTS):
                return self.on_stream_tokens(1)
            if b'"type":"tool-call-start"' in data:
                self.tool_calls += 1
            return self.cut is None
        if not data.startswith(b"data: {") or b'"choices"' not in data:
            return self.cut is None
        try:
            chunk = orjson.loads(data[6:])
        except orjson.JSONDecodeError:
            return self.cut is None
        tokens = 0
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            if isinstance(ids := choice.get("token_ids"), list) and "delta" not in choice:
                tokens += len(ids)  # a generate stream's event: its new token ids
                continue
            delta = choice.get("delta") or {}
            calls = delta.get("tool_calls") or ()
            self.tool_calls += sum(1 for c in calls if isinstance(c, dict) and c.get("id"))
            if delta.get("content") or choice.get("text") or calls or delta.get("reasoning_content"):
                tokens += 1
        return self.on_stream_tokens(tokens) if tokens else self.cut is None

    def on_response(self, body: Any) -> None:
        """A whole (non-streaming) response: count its tool calls."""
        if not isinstance(body, dict):
            return
        for choice in body.get("choices") or ():
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict) and isinstance(message.get("tool_calls"), list):
                self.tool_calls += len(message["tool_calls"])
        if body.get("object") == "response":  # a Responses answer: its output items
            self.tool_calls += sum(1 for item in body.get("output") or ()
                                   if isinstance(item, dict) and item.get("type") == "function_call")
        elif self.req.kind == COHERE_CHAT and isinstance(body.get("message"), dict):  # its message's calls
            calls = body["message"].get("tool_calls")
            self.tool_calls += len(calls) if isinstance(calls, list) else 0
        elif body.get("type") == "message":  # an Anthropic answer: its content blocks
            self.tool_calls += sum(1 for block in body.get("content") or ()
                                   if isinstance(block, dict) and block.get("type") == "tool_use")
