"""Parse and validate an OpenAI request body: the first stage of the request path.

Only what the router itself relies on is checked here; everything else is the worker's
job and its errors are passed through. Every failure is an ``InvalidRequest`` naming the
field, so a client always gets a 4xx with a clear message and never a crash.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import orjson
from aiohttp import web

from kvroute.router.chat_template import RESERVED_KWARGS, VIEW_FIELDS
from kvroute.router.errors import InvalidRequest, PayloadTooLarge, UnsupportedEncoding

CHAT = "chat"
COMPLETION = "completion"
EMBEDDING = "embedding"
RESPONSES = "responses"  # OpenAI's Responses API
MESSAGES = "messages"  # Anthropic's Messages API, which vLLM also serves
COUNT_TOKENS = "count_tokens"  # its token count: a prompt, nothing generated
TOKENIZE = "tokenize"  # vLLM's /tokenize and /detokenize: the model's own tokenizer, on a worker
DETOKENIZE = "detokenize"
SCORE = "score"  # vLLM's scoring and rerank APIs, on pooling workers: text pairs scored, nothing generated
RERANK = "rerank"
CLASSIFY = "classify"  # vLLM's /classify, on sequence-classification workers: labels and probabilities
POOL = "pooling"  # vLLM's /pooling: a pooling model's raw output
CHAT_BATCH = "chat_batch"  # vLLM's batch of conversations, each answered as a chat, in one request
COHERE_EMBED = "cohere_embed"  # Cohere's embed API (v2), which vLLM's embedding servers also serve
COHERE_CHAT = "cohere_chat"  # Cohere's chat API (v2), which vLLM serves with VLLM_ENABLE_COHERE_API=1
# vLLM's generative scoring: a query and items, each item scored by the probabilities of
# label tokens after query + item (one token generated per item).
GENERATIVE_SCORING = "generative_scoring"
# vLLM's token-in, token-out API (workers started with --enable-scale-out): a prompt's token
# ids and sampling params in, token ids out. Its renders turn a chat, completion, Messages or
# Responses request into that API's body, token ids and all, without a prefill.
GENERATE = "generate"
CHAT_RENDER = "chat_render"
COMPLETION_RENDER = "completion_render"
MESSAGES_RENDER = "messages_render"
RESPONSES_RENDER = "responses_render"
COHERE_CHAT_RENDER = "cohere_chat_render"
PATHS = {CHAT: "/v1/chat/completions", COMPLETION: "/v1/completions", EMBEDDING: "/v1/embeddings",
         RESPONSES: "/v1/responses", MESSAGES: "/v1/messages", COUNT_TOKENS: "/v1/messages/count_tokens",
         TOKENIZE: "/tokenize", DETOKENIZE: "/detokenize", SCORE: "/score", RERANK: "/rerank",
         CLASSIFY: "/classify", POOL: "/pooling", GENERATE: "/inference/v1/generate",
         CHAT_BATCH: "/v1/chat/completions/batch", COHERE_EMBED: "/v2/embed",
         GENERATIVE_SCORING: "/generative_scoring", COHERE_CHAT: "/cohere/v2/chat",
         CHAT_RENDER: "/v1/chat/completions/render", COMPLETION_RENDER: "/v1/completions/render",
         MESSAGES_RENDER: "/v1/messages/render", RESPONSES_RENDER: "/v1/responses/render",
         COHERE_CHAT_RENDER: "/cohere/v2/chat/render"}
# vLLM's other paths for the same APIs; the worker is sent the one in PATHS.
ALIASES = {"/v1/score": SCORE, "/v1/rerank": RERANK, "/v2/rerank": RERANK}
# A render takes the request it renders: checked, and read, as that request.
RENDERED = {CHAT_RENDER: CHAT, COMPLETION_RENDER: COMPLETION, MESSAGES_RENDER: MESSAGES,
            RESPONSES_RENDER: RESPONSES, COHERE_CHAT_RENDER: COHERE_CHAT}
# Requests a worker answers without a prefill: nothing to route by, cache, or generate.
NO_PREFILL = frozenset({COUNT_TOKENS, TOKENIZE, DETOKENIZE, *RENDERED})
# Requests a worker prefills and generates nothing for.
POOLING = frozenset({EMBEDDING, SCORE, RERANK, CLASSIFY, POOL, COHERE_EMBED})
# Requests that name token ids of their model's tokenizer (a prompt's, or labels to score):
# no other tier's model reads them the same.
ONE_TOKENIZER = frozenset({GENERATE, GENERATIVE_SCORING})
# Pooling APIs that take a prompt as a completion's ``input`` or a chat's ``messages``.
INPUT_OR_MESSAGES = frozenset({EMBEDDING, CLASSIFY, POOL})
# A score request's two sides, in the forms vLLM takes.
_SCORE_SIDES = (("text_1", "text_2"), ("data_1", "data_2"), ("queries", "documents"), ("queries", "items"))
_ROLES = {"system", "user", "assistant", "tool", "developer", "function"}
# A chat's fields that vLLM passes to its template (router/chat_template.py renders them too);
# the pooling APIs take the first four with a conversation, the Responses and Messages APIs
# only chat_template_kwargs.
_TEMPLATE_FIELDS = ("chat_template", *VIEW_FIELDS)
_POOLED_TEMPLATE_FIELDS = ("chat_template", "chat_template_kwargs", "add_generation_prompt", "continue_final_message")
# How vLLM tokenizes a prompt (router/prefix.py keys it the same way).
_TOKENIZE_FIELDS = ("add_special_tokens", "truncate_prompt_tokens", "truncation_side")
# Content codings aiohttp decodes (br and zstd only with their libraries installed; without
# them aiohttp refuses the request before any handler runs: router/server.py answers that).
_DECODED = frozenset({"", "identity", "gzip", "deflate", "br", "zstd"})


# The request headers the router reads or passes on: its own, and the W3C trace context.
_KEPT_HEADERS = ("x-kvroute-", "traceparent", "tracestate")

REQUEST_ID = "x-request-id"
RESPONSE_ID = re.compile(r"[A-Za-z0-9_-]{1,256}")  # a stored response's id: a path segment on the worker
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._~:/@+=-]{1,128}")


def request_id(headers: Mapping[str, str]) -> str:
    """The request's id: the client's ``X-Request-Id`` when it is a plain token of at most
    128 characters, else a new one. Workers get it (vLLM names its request after it)."""
    given = headers.get(REQUEST_ID)
    if given is not None and _REQUEST_ID_OK.fullmatch(given):
        return given
    return uuid.uuid4().hex


@dataclass(frozen=True)
class ParsedRequest:
    kind: str  # one of PATHS' keys
    path: str  # upstream path, e.g. /v1/chat/completions
    body: dict
    model: str
    stream: bool
    wants_usage_chunk: bool  # the client asked for stream_options.include_usage
    headers: Mapping[str, str]

    @property
    def max_tokens(self) -> int | None:
        """The completion tokens asked for: ``max_completion_tokens``, else ``max_tokens``;
        0 for embeddings and token counts, which generate none."""
        if self.kind in POOLING or self.kind in NO_PREFILL:
            return 0
        if self.kind == GENERATIVE_SCORING:
            return 1  # one token per item, whatever the body says
        if self.kind == RESPONSES:
            value = self.body.get("max_output_tokens")
        elif self.kind == GENERATE:
            value = self.body["sampling_params"].get("max_tokens")
        elif self.kind == COHERE_CHAT:
            value = self.body.get("max_tokens")  # vLLM reads no other key there
        else:
            value = self.body.get("max_completion_tokens") or self.body.get("max_tokens")
        return value if isinstance(value, int) else None

    @cached_property
    def sequences(self) -> int:
        """The sequences the worker generates, each up to ``max_tokens``: ``n`` for each of a
        completion's prompts (a generate request's ``n`` is in its ``sampling_params``); one for
        each of a generative scoring request's items."""
        if self.kind == GENERATIVE_SCORING:
            return len(self.body["items"])
        if self.kind == COHERE_CHAT:
            return 1  # Cohere's API has no n
        params = self.body["sampling_params"] if self.kind == GENERATE else self.body
        n = params.get("n")
        n = n if type(n) is int and n > 1 else 1
        if self.kind == CHAT_BATCH:
            return n * len(self.body["messages"])
        prompt = self.body.get("prompt") if self.kind == COMPLETION else None
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return n * len(prompt)  # a batch of prompts (token ids alone are one prompt)
        return n

    @property
    def continues_stored(self) -> bool:
        """A Responses request (or its render) that continues a stored one: most of its prompt
        is on a worker, the only one that can read it."""
        return self.kind in (RESPONSES, RESPONSES_RENDER) and bool(self.body.get("previous_response_id"))

    def with_max_tokens(self, n: int) -> ParsedRequest:
        """The same request asking for ``n`` completion tokens, under the key the client used."""
        if self.kind == GENERATIVE_SCORING:
            return self  # vLLM generates one token per item and reads no max_tokens
        if self.kind == RESPONSES:
            key = "max_output_tokens"
        elif self.kind == GENERATE:
            params = {**self.body["sampling_params"], "max_tokens": n}
            return replace(self, body={**self.body, "sampling_params": params})
        else:
            key = "max_completion_tokens" if "max_completion_tokens" in self.body else "max_tokens"
        return replace(self, body={**self.body, key: n})

    @cached_property
    def prompt_view(self) -> dict:
        """The prompt as the router reads it (prefix keys, the classifier, loops, prompt logs):
        a chat's or completion's body; ``{"prompt": input}`` for embeddings, classification
        and pooling (a conversation as a chat's messages), and a score's or rerank's texts,
        query first; a Responses or Anthropic Messages request as the chat messages vLLM
        renders from it; a generate request's token ids as a completion's; a generative
        scoring request's query and items as they are joined; a Cohere chat as the chat vLLM
        renders from it; a render as the request it renders."""
        kind = RENDERED.get(self.kind, self.kind)
        if kind in INPUT_OR_MESSAGES:
            return pooled_view(self.body)
        if kind in (SCORE, RERANK):
            return {"prompt": pair_texts(kind, self.body)}
        if kind == RESPONSES:
            return responses_as_chat(self.body)
        if kind in (MESSAGES, COUNT_TOKENS):
            return anthropic_as_chat(self.body)
        if kind == DETOKENIZE:
            return {"prompt": self.body["tokens"]}
        if kind == GENERATE:
            return {"prompt": self.body["token_ids"]}
        if kind == COHERE_EMBED:
            return cohere_view(self.body)
        if kind == GENERATIVE_SCORING:
            return scoring_view(self.body)
        if kind == COHERE_CHAT:
            return cohere_as_chat(self.body)
        if kind == CHAT_BATCH:  # keyed by its first conversation; the others count toward the estimates
            return {**self.body, "messages": self.body["messages"][0], "batch": self.body["messages"][1:]}
        return self.body


def pooled_view(body: dict) -> dict:
    """An embeddings, classification or pooling prompt as the router reads it: text or token
    ids as a completion's prompt; one conversation (``messages``, or embeddings' ``input``)
    as a chat's messages, keyed as its template renders them; a batch of conversations as
    their texts, which count toward load and budgets but key only approximately."""
    messages = body.get("messages")
    if messages is None and _conversations(body.get("input")):
        messages = body["input"]
    tokenizing = {k: body[k] for k in _TOKENIZE_FIELDS if k in body}
    if "truncate_prompt_tokens" in tokenizing:
        tokenizing.setdefault("truncation_side", "right")  # vLLM's pooling runner truncates so
    if messages is None:
        return {"prompt": body["input"], **tokenizing}
    if _conversation(messages):
        # vLLM's pooling APIs render a conversation without a generation prompt unless asked
        return {"messages": messages, "add_generation_prompt": body.get("add_generation_prompt", False),
                **{k: body[k] for k in _POOLED_TEMPLATE_FIELDS if k in body}, **tokenizing}
    return {"prompt": ["".join(_message_text(m) for m in conversation) for conversation in messages]}


def cohere_view(body: dict) -> dict:
    """A Cohere embed request's texts as a completion batch's prompts, cut as vLLM cuts them
    (``truncate`` START keeps the last ``max_tokens``, END the first); ``inputs`` as the
    texts of their parts, and images as nothing, which count but key only approximately."""
    texts = body.get("texts")
    if texts is None:
        texts = ["".join(p.get("text") or "" for p in i["content"] if isinstance(p.get("text"), str))
                 for i in body.get("inputs") or ()] or [""]
    view: dict[str, Any] = {"prompt": texts}
    if body.get("truncate", "END") != "NONE" and isinstance(body.get("max_tokens"), int):
        view["truncate_prompt_tokens"] = body["max_tokens"]
        view["truncation_side"] = "left" if body.get("truncate") == "START" else "right"
    return view


def scoring_view(body: dict) -> dict:
    """A generative scoring request's prompts: the query (tokenized with special tokens
    unless ``add_special_tokens`` is false) joined to each item (without), the item first
    with ``item_first``. The first item's prompt routes it; the others count."""
    view: dict[str, Any] = {"prompt": body["query"], "items": body["items"],
                            "item_first": body.get("item_first") is True}
    if body.get("add_special_tokens") is False:
        view["add_special_tokens"] = False
    return view


def cohere_as_chat(body: dict) -> dict:
    """A Cohere chat request as the chat vLLM renders from it (``CohereServingChatV2`` in
    vllm/entrypoints/cohere/serving.py): text blocks joined (a user's kept as parts unless one
    text), an assistant's ``thinking`` blocks and ``tool_plan`` as its reasoning, a tool's
    documents as their JSON; ``tools`` in chat form; ``documents`` as the template's."""
    messages = [_cohere_message(m) for m in body["messages"]]
    view: dict[str, Any] = {"messages": messages}
    kwargs = dict(body.get("chat_template_kwargs") or {})
    if body.get("documents"):
        kwargs.setdefault("documents", [
            {"id": f"doc_{i}", "data": {"text": d}} if isinstance(d, str) else
            {"id": d.get("id") or f"doc_{i}", "data": d["data"] if isinstance(d.get("data"), dict)
             else {"text": d.get("data")}} for i, d in enumerate(body["documents"])])
    if kwargs:
        view["chat_template_kwargs"] = kwargs
    strict = {"strict": True} if body.get("strict_tools") else {}
    tools = [{"type": "function", "function": {**{k: (t.get("function") or {}).get(k) for k in
                                                  ("name", "description", "parameters")}, **strict}}
             for t in body.get("tools") or ()]
    if tools:
        view["tools"] = tools
    return view


def _cohere_message(m: dict) -> dict:
    role, content = m["role"], m.get("content")
    if role == "system":
        return {"role": "system", "content": _cohere_text(content)}
    if role == "user":
        if isinstance(content, str):
            return {"role": "user", "content": content}
        parts = [{"type": "text", "text": _str(b.get("text"))} if b.get("type") == "text" else {"type": "image_url"}
                 for b in content or () if b.get("type") in ("text", "image_url")]
        if len(parts) == 1 and parts[0]["type"] == "text":
            return {"role": "user", "content": parts[0]["text"]}
        return {"role": "user", "content": parts}
    if role == "tool":
        if not isinstance(content, list):
            return {"role": "tool", "tool_call_id": m.get("tool_call_id"), "content": content}
        parts = [{"type": "text", "text": _str(b.get("text")) if b.get("type") == "text" else _document(b)}
                 for b in content if b.get("type") in ("text", "document")]
        return {"role": "tool", "tool_call_id": m.get("tool_call_id"), "content": parts}
    out: dict[str, Any] = {"role": "assistant"}  # the check let only these four roles through
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or ()
    text = [_str(b.get("text")) for b in blocks if b.get("type") == "text"]
    thinking = [_str(b.get("thinking")) for b in blocks if b.get("type") == "thinking"]
    if m.get("tool_plan") and isinstance(m["tool_plan"], str):
        thinking.append(m["tool_plan"])
    if text:
        out["content"] = "".join(text)
    if thinking:
        out["reasoning"] = "".join(thinking)
    if m.get("tool_calls"):
        out["tool_calls"] = [{"id": c.get("id"), "type": "function", "function": {
            "name": (c.get("function") or {}).get("name") or "",
            "arguments": (c.get("function") or {}).get("arguments") or "{}"}} for c in m["tool_calls"]]
    return out


def _cohere_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(_str(b.get("text")) for b in content or ())


def _str(value: Any) -> str:
    """A text field as the router keys it: anything else (which vLLM refuses) as nothing."""
    return value if isinstance(value, str) else ""


def _document(block: dict) -> str:
    """A tool result's document as vLLM writes it into the tool message: its JSON."""
    document = block.get("document")
    if not isinstance(document, dict):
        return ""
    return json.dumps({k: document[k] for k in ("data", "id") if document.get(k) is not None})  # the SDK's order


def _message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text") or "" for p in content if isinstance(p.get("text"), str))
    return f"{message.get('role', '')}: {content or ''}\n"


def _conversation(value: Any) -> bool:
    """A list of message objects, as vLLM tells one apart from a list of texts or ids."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _conversations(value: Any) -> bool:
    """One conversation, or a batch of them (a list of conversations)."""
    return _conversation(value) or (isinstance(value, list) and bool(value) and all(_conversation(c) for c in value))


def pair_texts(kind: str, body: dict) -> list[str]:
    """A score or rerank request's texts, its first side (the query) first: the query's keys
    route it, and every text counts toward load and budgets. Images are left out."""
    if kind == RERANK:
        sides = (body["query"], body["documents"])
    else:
        first, second = _score_pair(body) or ("", "")  # parse_request checked there is one
        sides = (body[first], body[second])
    texts = [t for side in sides for t in (side if isinstance(side, list) else [side]) if isinstance(t, str)]
    return texts or [""]


def responses_as_chat(body: dict) -> dict:
    """A Responses request's ``instructions``, ``input`` and ``tools`` as the chat vLLM renders
    from them (``construct_input_messages`` in vllm/entrypoints/openai/responses/utils.py):
    instructions as the system message, then each input item. Function calls, reasoning and
    an assistant message's text join the assistant message before them while it lacks one;
    an assistant message keeps its first part's text; other messages go as they are, their
    text parts joined when rendered."""
    messages: list[dict] = []
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        messages.append({"role": "system", "content": body["instructions"]})
    items = body["input"]
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
        items = []
    turn: list[dict] = []  # the input items' messages: a merge never reaches the instructions
    for item in items:
        kind = item.get("type", "message")
        previous = turn[-1] if turn and turn[-1].get("role") == "assistant" else None
        if kind == "function_call":
            function = {"name": item.get("name"), "arguments": item.get("arguments")}
            call = {"id": item.get("call_id"), "function": function, "type": "function"}
            if previous is not None:
                previous["tool_calls"] = [*(previous.get("tool_calls") or ()), call]
            else:
                turn.append({"role": "assistant", "tool_calls": [call]})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or [{}]
            text = parts[0].get("text", "") if isinstance(parts[0], dict) else ""
            if previous is not None and previous.get("reasoning") is None:
                previous["reasoning"] = text
            else:
                turn.append({"role": "assistant", "reasoning": text})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            turn.append({"role": "tool", "content": item.get("output"), "tool_call_id": item.get("call_id")})
        elif item.get("role") == "assistant" and (text := _first_text(item.get("content"))) is not None:
            if previous is not None and previous.get("content") is None:
                previous["content"] = text
            else:
                turn.append({"role": "assistant", "content": text})
        elif "role" in item:
            turn.append(dict(item))  # a copy: a later call may join it, and the body goes to the worker
    messages += turn
    # A partial assistant message (or reasoning) last is continued, as vLLM does it.
    last = items[-1] if items else None
    partial = (isinstance(last, dict) and last.get("type", "message") in ("message", "reasoning")
               and last.get("status") in ("in_progress", "incomplete"))
    # vLLM tokenizes a Responses prompt with the tokenizer's special tokens (a BOS), where a
    # chat's has none (ResponsesRequest.build_tok_params).
    view: dict[str, Any] = {"messages": messages, "add_special_tokens": True}
    if partial:
        view.update(add_generation_prompt=False, continue_final_message=True)
    _template_fields(view, body, (body.get("reasoning") or {}).get("effort"))
    tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
             for t in body.get("tools") or () if isinstance(t, dict) and t.get("type") == "function"]
    if tools:
        view["tools"] = tools
    return view


def _first_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and isinstance(content[0], dict):
        return content[0].get("text")
    return None


_BILLING_HEADER = "x-anthropic-billing-header"  # Claude Code's per-request system block: vLLM drops it


def anthropic_as_chat(body: dict) -> dict:
    """An Anthropic Messages request as the chat vLLM renders from it
    (vllm/entrypoints/anthropic/serving.py): ``system``'s text blocks joined, less Claude
    Code's billing header; in each message, text blocks as parts (one alone as a string),
    ``thinking`` as reasoning, ``tool_use`` as tool calls (arguments as ``json.dumps``
    writes them), and a user's ``tool_result`` blocks as tool messages before it; ``tools``
    in chat form."""
    messages: list[dict] = []
    system = body.get("system")
    if isinstance(system, list):
        system = "".join(b["text"] for b in system if b.get("type") == "text" and isinstance(b.get("text"), str)
                         and b["text"] and not b["text"].startswith(_BILLING_HEADER))
    if system:
        messages.append({"role": "system", "content": system})
    for m in body["messages"]:
        content = m.get("content")
        if isinstance(content, str):
            messages.append({"role": m["role"], "content": content})
            continue
        message: dict[str, Any] = {"role": m["role"]}
        parts: list[dict] = []
        calls: list[dict] = []
        reasoning: list[str] = []
        for b in content:
            kind = b.get("type")
            if kind == "text" and isinstance(b.get("text"), str) and b["text"]:
                parts.append({"type": "text", "text": b["text"]})
            elif kind == "image":
                parts.append({"type": "image_url"})  # not text: keys leave it out, but the content stays parts
            elif kind == "thinking" and isinstance(b.get("thinking"), str):
                reasoning.append(b["thinking"])
            elif kind == "tool_use":
                calls.append({"id": b.get("id") or "", "type": "function", "function": {
                    "name": b.get("name") or "", "arguments": json.dumps(b.get("input") or {})}})
            elif kind == "tool_result" and m["role"] == "user":
                messages.append({"role": "tool", "tool_call_id": b.get("tool_use_id") or "",
                                 "content": _result_text(b.get("content"))})
            elif kind == "tool_result":
                parts.append({"type": "text", "text": f"Tool result: {b['content'] if b.get('content') else ''}"})
        if reasoning:
            message["reasoning"] = "".join(reasoning)
        if calls:
            message["tool_calls"] = calls
        if parts:
            message["content"] = parts[0]["text"] if len(parts) == 1 and parts[0]["type"] == "text" else parts
        if m["role"] != "user" or "content" in message:
            messages.append(message)
    view: dict[str, Any] = {"messages": messages}
    _template_fields(view, body, (body.get("output_config") or {}).get("effort"))
    tools = [{"type": "function", "function": {"name": t.get("name"), "description": t.get("description"),
                                               "parameters": t.get("input_schema"), "strict": t.get("strict"),
                                               "defer_loading": t.get("defer_loading")}}
             for t in body.get("tools") or () if isinstance(t, dict) and "name" in t]
    if tools:
        view["tools"] = tools
    return view


def _result_text(content: Any) -> str:
    """A user's ``tool_result`` content as vLLM writes it into the tool message."""
    if isinstance(content, list):
        return "\n".join(i.get("text", "") for i in content if isinstance(i, dict) and i.get("type") == "text")
    return content if isinstance(content, str) else ""


def _template_fields(view: dict[str, Any], body: dict, effort: Any) -> None:
    """A Responses or Messages request's ``chat_template_kwargs`` and reasoning effort, which
    vLLM passes to the template."""
    if body.get("chat_template_kwargs"):
        view["chat_template_kwargs"] = body["chat_template_kwargs"]
    if isinstance(effort, str):
        view["reasoning_effort"] = effort


def authorization(headers: Mapping[str, str]) -> str | None:
    """The caller's key as ``Authorization``: its own, or Anthropic clients' ``x-api-key`` as a bearer token."""
    auth = headers.get("Authorization")
    if auth is None and (key := headers.get("x-api-key")):
        return f"Bearer {key}"
    return auth


def check_headers(headers: Mapping[str, str]) -> None:
    """The headers the router reads (x-kvroute-*, traceparent, Authorization) must be printable
    ASCII, as HTTP says: other bytes reach Python as lone surrogates that no hash, key or
    Redis call can encode, so they get a 400 here rather than a 500 deep in the request."""
    for name, value in headers.items():
        lower = name.lower()
        if ((lower.startswith("x-kvroute-") or lower in ("authorization", "x-api-key", "traceparent"))
                and not (value.isascii() and value.isprintable())):
            raise InvalidRequest(f"Header '{lower}' must be printable ASCII", param=lower)


async def read_body(request: web.Request, max_bytes: int) -> bytes:
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(f"Request body of {request.content_length} bytes exceeds the "
                              f"limit of {max_bytes} bytes.")
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in _DECODED:  # aiohttp would hand the coded bytes over as if plain
        # Echoed escaped: non-ASCII header bytes reach Python as lone surrogates, which would
        # make the error body invalid UTF-8.
        shown = encoding[:64].encode("ascii", "backslashreplace").decode("ascii")
        raise UnsupportedEncoding(f"Content-Encoding '{shown}' is not supported; send the body "
                                  "unencoded, or gzip or deflate", param="content-encoding")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"Request body exceeds the limit of {max_bytes} bytes.") from None
    except web.RequestPayloadError as exc:  # e.g. Content-Encoding: gzip over a plain body
        if encoding and encoding != "identity":
            raise InvalidRequest(f"Request body is not valid {encoding} data (Content-Encoding: {encoding})",
                                 param="content-encoding") from None
        raise InvalidRequest(f"Request body could not be read: {exc}") from None


def _field(body: dict, name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is not None and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
        raise InvalidRequest(f"'{name}' must be {what}, got {type(value).__name__}", param=name)
    return value


def _check_messages(messages: Any, name: str = "messages") -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(f"'{name}' must be a non-empty list of message objects", param=name)
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest(f"'{name}[{i}]' must be an object", param=f"{name}[{i}]")
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise InvalidRequest(f"'{name}[{i}].role' must be one of {', '.join(sorted(_ROLES))}",
                                 param=f"{name}[{i}].role")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidRequest(f"'{name}[{i}].content' must be a string or a list of parts",
                                 param=f"{name}[{i}].content")
        if isinstance(content, list) and not all(isinstance(p, dict) for p in content):
            raise InvalidRequest(f"'{name}[{i}].content' parts must be objects", param=f"{name}[{i}].content")


def _check_template_fields(body: dict, names: tuple[str, ...] = _TEMPLATE_FIELDS) -> None:
    """The template fields a chat may carry, as vLLM checks them: the router renders with them."""
    if "chat_template" in names:
        _field(body, "chat_template", (str,), "a string")
    kwargs = _field(body, "chat_template_kwargs", (dict,), "an object")
    for reserved in RESERVED_KWARGS:
        if kwargs and reserved in kwargs:
            raise InvalidRequest(f"'chat_template_kwargs.{reserved}' is not allowed; it is not a template variable",
                                 param=f"chat_template_kwargs.{reserved}")
    if "add_generation_prompt" not in names:
        return
    add = _field(body, "add_generation_prompt", (bool,), "a boolean")
    if _field(body, "continue_final_message", (bool,), "a boolean") and add:
        raise InvalidRequest("Cannot set both 'continue_final_message' and 'add_generation_prompt' to true",
                             param="continue_final_message")
    if "documents" in names:
        documents = _field(body, "documents", (list,), "a list of objects")
        if documents is not None and not all(isinstance(d, dict) for d in documents):
            raise InvalidRequest("'documents' must be a list of objects", param="documents")
        _field(body, "reasoning_effort", (str,), "a string")


def _ids(value: Any) -> bool:
    """A list of token ids: integers that fit the 32 bits vLLM's ids (and the block hashes) use."""
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in value)


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt) or _ids(prompt) or all(_ids(p) for p in prompt):
            return
    raise InvalidRequest("'prompt' must be a string, a list of strings, token ids (0 to 2^32 - 1), "
                         "or lists of token ids", param="prompt")


def _check_input(value: Any) -> None:
    """An embeddings ``input``: a string, strings, token ids, or lists of token ids, none empty."""
    if isinstance(value, str):
        if value:
            return
    elif isinstance(value, list) and value:
        if all(isinstance(p, str) and p for p in value) or _ids(value) or all(_ids(p) and p for p in value):
            return
    raise InvalidRequest("'input' must be a non-empty string, a list of non-empty strings, token ids "
                         "(0 to 2^32 - 1), or lists of token ids", param="input")


def _check_responses(body: dict) -> None:
    """The fields of a Responses request the router reads: ``input`` (a string or a list of
    item objects, whose ``role`` and ``content`` it renders), ``instructions`` and ``tools``."""
    if "input" not in body:
        raise InvalidRequest("'input' is required", param="input")
    items = body["input"]
    if isinstance(items, str):
        if not items:
            raise InvalidRequest("'input' must not be empty", param="input")
    elif not isinstance(items, list) or not items:
        raise InvalidRequest("'input' must be a string or a non-empty list of input items", param="input")
    else:
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise InvalidRequest(f"'input[{i}]' must be an object", param=f"input[{i}]")
            if "role" in item and item["role"] not in _ROLES:
                raise InvalidRequest(f"'input[{i}].role' must be one of {', '.join(sorted(_ROLES))}",
                                     param=f"input[{i}].role")
            content = item.get("content")
            if content is not None and not (isinstance(content, str) or (
                    isinstance(content, list) and all(isinstance(p, dict) for p in content))):
                raise InvalidRequest(f"'input[{i}].content' must be a string or a list of content parts",
                                     param=f"input[{i}].content")
    _field(body, "instructions", (str,), "a string")
    tools = _field(body, "tools", (list,), "a list")
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise InvalidRequest("'tools' must be a list of objects", param="tools")
    value = _field(body, "max_output_tokens", (int,), "an integer")
    if value is not None and value < 1:
        raise InvalidRequest("'max_output_tokens' must be at least 1", param="max_output_tokens")
    _check_template_fields(body, ("chat_template_kwargs",))
    _field(body, "reasoning", (dict,), "an object")
    previous = _field(body, "previous_response_id", (str,), "a string")
    if previous is not None and not RESPONSE_ID.fullmatch(previous):
        raise InvalidRequest("'previous_response_id' must be a response id (letters, digits, '_' and '-')",
                             param="previous_response_id")


def _score_pair(body: dict) -> tuple[str, str] | None:
    """The names of a score request's two sides, in the first of vLLM's forms it uses."""
    return next((p for p in _SCORE_SIDES if p[0] in body and p[1] in body), None)


def _check_scoring(kind: str, body: dict) -> None:
    """A rerank's ``query`` and ``documents``; a score's two sides, in one of vLLM's forms.
    Each side is a text (or a multimodal object) or a non-empty list of them."""
    if kind == RERANK:
        if not isinstance(body.get("query"), (str, dict)):
            raise InvalidRequest("'query' is required: a string", param="query")
        names: tuple[str, ...] = ("documents",)
        top_n = _field(body, "top_n", (int,), "an integer")
        if top_n is not None and top_n < 0:
            raise InvalidRequest("'top_n' must be at least 0", param="top_n")
    else:
        pair = _score_pair(body)
        if pair is None:
            raise InvalidRequest("'/score' takes 'text_1' and 'text_2' (or 'data_1' and 'data_2', 'queries' and "
                                 "'documents', 'queries' and 'items')", param="text_1")
        names = pair
    for name in names:
        side = body.get(name)
        if not (isinstance(side, (str, dict)) or (
                isinstance(side, list) and side and all(isinstance(x, (str, dict)) for x in side))):
            raise InvalidRequest(f"'{name}' must be a string or a non-empty list of strings", param=name)


def _check_tokenize(body: dict) -> None:
    """vLLM's /tokenize takes a completion's ``prompt`` (a string) or a chat's ``messages``."""
    if ("prompt" in body) == ("messages" in body):
        raise InvalidRequest("'/tokenize' takes either 'prompt' or 'messages'", param="prompt")
    if "prompt" in body and not isinstance(body["prompt"], str):
        raise InvalidRequest("'prompt' must be a string", param="prompt")
    if "messages" in body:
        _check_messages(body["messages"])
        _check_template_fields(body)


def _message_objects(body: dict, roles: tuple[str, ...]) -> list[dict]:
    """``messages``: a non-empty list of objects, each with one of ``roles``."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list of message objects", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest(f"'messages[{i}]' must be an object", param=f"messages[{i}]")
        if m.get("role") not in roles:
            raise InvalidRequest(f"'messages[{i}].role' must be one of {', '.join(roles)}",
                                 param=f"messages[{i}].role")
    return messages


def _check_anthropic(body: dict) -> None:
    """The fields of a Messages request the router reads: ``messages`` (roles, and content as
    a string or blocks), ``system`` and ``tools``."""
    messages = _message_objects(body, ("user", "assistant"))
    for i, m in enumerate(messages):
        content = m.get("content")
        if not (isinstance(content, str) or (isinstance(content, list) and all(isinstance(b, dict) for b in content))):
            raise InvalidRequest(f"'messages[{i}].content' must be a string or a list of content blocks",
                                 param=f"messages[{i}].content")
    system = body.get("system")
    if system is not None and not (isinstance(system, str) or (
            isinstance(system, list) and all(isinstance(b, dict) for b in system))):
        raise InvalidRequest("'system' must be a string or a list of content blocks", param="system")
    tools = _field(body, "tools", (list,), "a list")
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise InvalidRequest("'tools' must be a list of objects", param="tools")
    _check_template_fields(body, ("chat_template_kwargs",))
    _field(body, "output_config", (dict,), "an object")


def _check_pooled(kind: str, body: dict) -> None:
    """``input`` (text or token ids; for embeddings also a conversation or a batch of them)
    or ``messages`` (one conversation; for embeddings also a batch), not both."""
    has_input, has_messages = body.get("input") is not None, body.get("messages") is not None
    if has_input == has_messages:
        raise InvalidRequest("Give exactly one of 'input' and 'messages'" if has_input
                             else "'input' is required (or 'messages', a conversation)", param="input")
    batch_ok = kind == EMBEDDING  # vLLM takes batched conversations on /v1/embeddings only
    name = "messages" if has_messages else "input"
    value = body[name]
    if batch_ok and not _conversation(value) and _conversations(value):
        for j, conversation in enumerate(value):
            _check_messages(conversation, f"{name}[{j}]")
    elif has_messages or (batch_ok and _conversation(value)):
        _check_messages(value, name)
        _check_template_fields(body, _POOLED_TEMPLATE_FIELDS)
    else:
        _check_input(value)


def _check_generate(body: dict) -> None:
    """A token-in request: ``token_ids`` (not empty) and ``sampling_params`` (an object, whose
    ``max_tokens`` and ``n`` the router reads)."""
    ids = body.get("token_ids")
    if not _ids(ids) or not ids:
        raise InvalidRequest("'token_ids' is required: a non-empty list of token ids (0 to 2^32 - 1)",
                             param="token_ids")
    params = body.get("sampling_params")
    if not isinstance(params, dict):
        raise InvalidRequest("'sampling_params' is required and must be an object", param="sampling_params")
    for name in ("max_tokens", "n"):
        value = params.get(name)
        if value is not None and (type(value) is not int or value < 1):
            raise InvalidRequest(f"'sampling_params.{name}' must be an integer of at least 1",
                                 param=f"sampling_params.{name}")


def _check_cohere_embed(body: dict) -> None:
    """Exactly one of ``texts`` (strings), ``images`` (strings) and ``inputs`` (objects with
    ``content`` parts), not empty; ``truncate`` one of NONE, START, END."""
    given = [name for name in ("texts", "images", "inputs") if body.get(name) is not None]
    if len(given) != 1:
        raise InvalidRequest("Give exactly one of 'texts', 'images' and 'inputs'", param="texts")
    name, value = given[0], body[given[0]]
    item_ok = _cohere_input if name == "inputs" else lambda v: isinstance(v, str)
    if not isinstance(value, list) or not value or not all(item_ok(v) for v in value):
        what = "objects with a 'content' list of parts" if name == "inputs" else "strings"
        raise InvalidRequest(f"'{name}' must be a non-empty list of {what}", param=name)
    if body.get("truncate", "END") not in ("NONE", "START", "END"):
        raise InvalidRequest("'truncate' must be NONE, START or END", param="truncate")


def _cohere_input(value: Any) -> bool:
    """One of a Cohere embed request's ``inputs``: an object with a ``content`` list of parts."""
    content = value.get("content") if isinstance(value, dict) else None
    return isinstance(content, list) and all(isinstance(p, dict) for p in content)


def _check_chat_batch(body: dict) -> None:
    """``messages``: a non-empty list of conversations, each checked as a chat's."""
    conversations = body.get("messages")
    if not isinstance(conversations, list) or not conversations or not all(
            isinstance(c, list) for c in conversations):
        raise InvalidRequest("'messages' must be a non-empty list of conversations (lists of messages)",
                             param="messages")
    for j, conversation in enumerate(conversations):
        _check_messages(conversation, f"messages[{j}]")
    _check_template_fields(body)


def _check_generative_scoring(body: dict) -> None:
    """``query`` (a string or token ids), ``items`` (strings, or lists of token ids; not
    empty) and ``label_token_ids`` (not empty), as vLLM takes them."""
    query = body.get("query")
    if not (isinstance(query, str) or (_ids(query) and query)):
        raise InvalidRequest("'query' is required: a string or a non-empty list of token ids (0 to 2^32 - 1)",
                             param="query")
    items = body.get("items")
    if not isinstance(items, list) or not items or not (
            all(isinstance(i, str) for i in items) or all(_ids(i) and i for i in items)):
        raise InvalidRequest("'items' must be a non-empty list of strings, or of non-empty lists of token ids "
                             "(0 to 2^32 - 1)", param="items")
    labels = body.get("label_token_ids")
    if not _ids(labels) or not labels:
        raise InvalidRequest("'label_token_ids' is required: a non-empty list of token ids (0 to 2^32 - 1)",
                             param="label_token_ids")
    for name in ("item_first", "add_special_tokens", "apply_softmax"):
        _field(body, name, (bool,), "a boolean")


_COHERE_ROLES = ("system", "user", "assistant", "tool")


def _check_cohere_chat(body: dict) -> None:
    """The fields of a Cohere chat the router reads: ``messages`` (roles, content as a
    string or block objects, an assistant's ``tool_calls``), ``tools`` and ``documents``."""
    for i, m in enumerate(_message_objects(body, _COHERE_ROLES)):
        content = m.get("content")
        if not (isinstance(content, str) or (isinstance(content, list) and all(isinstance(b, dict) for b in content))
                or (content is None and m["role"] == "assistant")):
            raise InvalidRequest(f"'messages[{i}].content' must be a string or a list of content blocks",
                                 param=f"messages[{i}].content")
        calls = m.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and all(
                isinstance(c, dict) and isinstance(c.get("function", {}), dict) for c in calls)):
            raise InvalidRequest(f"'messages[{i}].tool_calls' must be a list of tool call objects",
                                 param=f"messages[{i}].tool_calls")
    tools = _field(body, "tools", (list,), "a list")
    if tools is not None and not all(isinstance(t, dict) and isinstance(t.get("function", {}), dict) for t in tools):
        raise InvalidRequest("'tools' must be a list of tool objects", param="tools")
    documents = _field(body, "documents", (list,), "a list")
    if documents is not None and not all(isinstance(d, (str, dict)) for d in documents):
        raise InvalidRequest("'documents' must be a list of strings or document objects", param="documents")
    _check_template_fields(body, ("chat_template_kwargs",))


def _check_embedding(body: dict) -> None:
    _check_pooled(EMBEDDING, body)
    if _field(body, "stream", (bool,), "a boolean"):
        raise InvalidRequest("'stream' is not supported for embeddings", param="stream")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    dims = _field(body, "dimensions", (int,), "an integer")
    if dims is not None and dims < 1:
        raise InvalidRequest("'dimensions' must be at least 1", param="dimensions")


def parse_request(kind: str, raw: bytes, headers: Mapping[str, str], rid: str | None = None) -> ParsedRequest:
    """The request, checked; ``rid``: its id (:func:`request_id`), kept with the headers the
    router reads, for workers, logs and traces."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string", param="model")
    checked = RENDERED.get(kind, kind)
    if checked == CHAT:
        if "messages" not in body:
            raise InvalidRequest("'messages' is required", param="messages")
        _check_messages(body["messages"])
        _check_template_fields(body)
    elif checked == EMBEDDING:
        _check_embedding(body)
    elif checked == RESPONSES:
        _check_responses(body)
    elif checked in (MESSAGES, COUNT_TOKENS):
        _check_anthropic(body)
    elif checked == TOKENIZE:
        _check_tokenize(body)
    elif checked in (SCORE, RERANK):
        _check_scoring(kind, body)
    elif checked in (CLASSIFY, POOL):
        _check_pooled(kind, body)
    elif checked == GENERATE:
        _check_generate(body)
    elif checked == COHERE_EMBED:
        _check_cohere_embed(body)
    elif checked == CHAT_BATCH:
        _check_chat_batch(body)
    elif checked == GENERATIVE_SCORING:
        _check_generative_scoring(body)
    elif checked == COHERE_CHAT:
        _check_cohere_chat(body)
    elif checked == DETOKENIZE:
        if not _ids(body.get("tokens")):
            raise InvalidRequest("'tokens' is required: a list of token ids (0 to 2^32 - 1)", param="tokens")
    else:
        if "prompt" not in body:
            raise InvalidRequest("'prompt' is required", param="prompt")
        _check_prompt(body["prompt"])
        # Not a completion field, but the prompt's keys are read from 'messages' when it is there
        # (router/prefix.py): junk in it must be a 400 here, not a 500 there.
        if body.get("messages") is not None:
            _check_messages(body["messages"])
    # A render's answer is a body, streamed or not: its 'stream' is for the request it renders.
    # vLLM answers generative scoring whole too, and takes a 'stream' there without reading it.
    stream = bool(_field(body, "stream", (bool,), "a boolean")) and kind not in RENDERED and kind != GENERATIVE_SCORING
    if stream and (kind in NO_PREFILL or kind in POOLING or kind == CHAT_BATCH):
        raise InvalidRequest(f"'stream' is not supported on {PATHS[kind]}", param="stream")
    for name in ("max_tokens", "max_completion_tokens", "n"):
        value = _field(body, name, (int,), "an integer")
        if value is not None and value < 1:
            raise InvalidRequest(f"'{name}' must be at least 1", param=name)
    for name in ("temperature", "top_p"):
        _field(body, name, (int, float), "a number")
    if _field(body, "cache_salt", (str,), "a string") == "":  # vLLM's rule; the router keys by it
        raise InvalidRequest("'cache_salt' must be a non-empty string", param="cache_salt")
    stream_options = _field(body, "stream_options", (dict,), "an object") or {}
    return ParsedRequest(
        kind=kind,
        path=PATHS[kind],
        body=body,
        model=model,
        stream=stream,
        wants_usage_chunk=bool(stream_options.get("include_usage")),
        headers={**{k.lower(): v for k, v in headers.items() if k.lower().startswith(_KEPT_HEADERS)},
                 **({REQUEST_ID: rid} if rid is not None else {})},
    )
