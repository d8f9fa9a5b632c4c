"""Cache entries: what is stored for an answer, and how a hit is replayed.

An entry holds the answer as a whole (non-streaming) OpenAI response object, whichever
way it reached the first client: a streamed answer is assembled from its chunks. One
entry so serves both kinds of client. A hit replays the stored ``choices`` unchanged; its
``usage`` keeps the original token counts and marks every prompt token as cached
(``prompt_tokens_details.cached_tokens`` = ``prompt_tokens``), which is how a client can
tell a replay from a fresh answer besides the ``x-kvroute-cache: hit`` header.

A streaming client gets a well-formed SSE stream of the same answer: per choice, one chunk
with the role and the whole content (and tool calls), one with the finish reason, the usage
chunk when ``stream_options.include_usage`` asked for it, then ``data: [DONE]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from kvroute.router.requests import CHAT

VERSION = 1


@dataclass(frozen=True)
class Entry:
    kind: str  # CHAT or COMPLETION
    body: dict  # the whole response object, usage included
    tier: str | None  # the tier that answered
    usd: float  # what the answer cost (saved again by every hit)

    def encode(self) -> bytes:
        return orjson.dumps({"v": VERSION, "kind": self.kind, "body": self.body, "tier": self.tier, "usd": self.usd})

    @classmethod
    def decode(cls, raw: bytes) -> Entry | None:
        """None for an entry this version cannot read (written by another version, or junk)."""
        try:
            d = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(d, dict) or d.get("v") != VERSION or not complete(d.get("body")):
            return None
        return cls(d["kind"], d["body"], d.get("tier"), float(d.get("usd") or 0.0))

    @property
    def usage(self) -> dict:
        usage = self.body.get("usage")
        return usage if isinstance(usage, dict) else {}

    @property
    def tokens(self) -> int:
        """Prompt plus completion tokens: what a hit saves."""
        return sum(v for k in ("prompt_tokens", "completion_tokens")
                   if isinstance(v := self.usage.get(k), int) and not isinstance(v, bool))


def complete(body: Any) -> bool:
    """A response worth storing: choices, each with a finish reason; or embeddings."""
    if isinstance(body, dict) and body.get("object") == "list":
        return isinstance(body.get("data"), list) and bool(body["data"])
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list) or not body["choices"]:
        return False
    return all(isinstance(c, dict) and c.get("finish_reason") for c in body["choices"])


def cached_usage(usage: dict) -> dict:
    out = dict(usage)
    prompt = usage.get("prompt_tokens")
    if isinstance(prompt, int):
        details = usage.get("prompt_tokens_details")
        out["prompt_tokens_details"] = {**(details if isinstance(details, dict) else {}), "cached_tokens": prompt}
    return out


def json_body(entry: Entry) -> bytes:
    return orjson.dumps({**entry.body, "usage": cached_usage(entry.usage)})


def sse_events(entry: Entry, include_usage: bool) -> list[bytes]:
    body = entry.body
    head = {"id": body.get("id"), "created": body.get("created"), "model": body.get("model")}
    chunks: list[dict] = []
    for choice in body["choices"]:
        index = choice.get("index", 0)
        if entry.kind == CHAT:
            head["object"] = "chat.completion.chunk"
            message = choice.get("message") or {}
            delta: dict[str, Any] = {"role": message.get("role") or "assistant", "content": message.get("content")}
            if message.get("reasoning_content"):
                delta["reasoning_content"] = message["reasoning_content"]
            if message.get("tool_calls"):
                delta["tool_calls"] = [{"index": j, **call} for j, call in enumerate(message["tool_calls"])]
            chunks.append({**head, "choices": [{"index": index, "delta": delta, "logprobs": choice.get("logprobs"),
                                                "finish_reason": None}]})
            chunks.append({**head, "choices": [{"index": index, "delta": {}, "logprobs": None,
                                                "finish_reason": choice["finish_reason"]}]})
        else:
            head["object"] = "text_completion"
            chunks.append({**head, "choices": [{"index": index, "text": choice.get("text") or "",
                                                "logprobs": choice.get("logprobs"), "finish_reason": None}]})
            chunks.append({**head, "choices": [{"index": index, "text": "", "logprobs": None,
                                                "finish_reason": choice["finish_reason"]}]})
    if include_usage:
        chunks.append({**head, "choices": [], "usage": cached_usage(entry.usage)})
    return [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


def assemble(kind: str, events: list[bytes], usage: dict | None) -> dict | None:
    """The whole response object of a streamed answer (its SSE events as relayed); None when
    it cannot be rebuilt exactly (logprobs, a malformed or unfinished stream)."""
    first: dict | None = None
    choices: dict[int, dict] = {}
    for event in events:
        for line in event.splitlines():
            if not line.startswith(b"data: {"):
                continue
            try:
                chunk = orjson.loads(line[6:])
            except orjson.JSONDecodeError:
                return None
            if not isinstance(chunk, dict):
                return None
            first = first or chunk
            for c in chunk.get("choices") or ():
                if not isinstance(c, dict) or c.get("logprobs"):
                    return None
                if not _add(kind, choices.setdefault(c.get("index", 0), {}), c):
                    return None
    if first is None or not choices:
        return None
    out = {"id": first.get("id"), "object": "chat.completion" if kind == CHAT else "text_completion",
           "created": first.get("created"), "model": first.get("model"),
           "choices": [_choice(kind, i, acc) for i, acc in sorted(choices.items())], "usage": usage}
    return out if complete(out) else None


def _add(kind: str, acc: dict, c: dict) -> bool:
    if c.get("finish_reason"):
        acc["finish_reason"] = c["finish_reason"]
    if kind != CHAT:
        acc["text"] = acc.get("text", "") + (c.get("text") or "")
        return True
    delta = c.get("delta") or {}
    if not isinstance(delta, dict):
        return False
    for field in ("content", "reasoning_content"):
        if delta.get(field):
            acc[field] = acc.get(field, "") + delta[field]
    for call in delta.get("tool_calls") or ():
        if not isinstance(call, dict):
            return False
        slot = acc.setdefault("tool_calls", {}).setdefault(call.get("index", 0),
                                                          {"function": {"name": "", "arguments": ""}})
        for k in ("id", "type"):
            if call.get(k):
                slot[k] = call[k]
        fn = call.get("function") or {}
        for k in ("name", "arguments"):
            if fn.get(k):
                slot["function"][k] += fn[k]
    return True


def _choice(kind: str, index: int, acc: dict) -> dict:
    if kind != CHAT:
        return {"index": index, "text": acc.get("text", ""), "logprobs": None,
                "finish_reason": acc.get("finish_reason")}
    message: dict[str, Any] = {"role": "assistant", "content": acc.get("content")}
    if acc.get("reasoning_content"):
        message["reasoning_content"] = acc["reasoning_content"]
    if acc.get("tool_calls"):
        message["tool_calls"] = [acc["tool_calls"][j] for j in sorted(acc["tool_calls"])]
    return {"index": index, "message": message, "logprobs": None, "finish_reason": acc.get("finish_reason")}
