"""Chats rendered as vLLM renders them (router/chat_template.py): the server's template and
default kwargs from the config, the request's template fields, text parts, developer
messages, and content-part templates. tests/integration/test_chat_template_fleet.py holds
the same renderings against a real vLLM server's."""

from __future__ import annotations

import orjson
import pytest

from kvroute.router.app import create_app
from kvroute.router.chat_template import TemplateConfig, content_format, render
from kvroute.router.config import config_from_dict
from kvroute.router.errors import ConfigError, InvalidRequest
from kvroute.router.prefix import Prefixer, PromptTokenizer
from kvroute.router.requests import CHAT, COUNT_TOKENS, EMBEDDING, MESSAGES, RESPONSES, parse_request
from tests.governance.conftest import worker_url

# A template that shows every variable the router passes, and reads content as a string.
SHOW = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if persona %}[persona={{ persona }}]{% endif %}"
        "{% if enable_thinking is defined %}[thinking={{ enable_thinking }}]{% endif %}"
        "{% if documents %}[docs={{ documents | length }}]{% endif %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
# One that loops over content parts, as multimodal models' templates do.
PARTS = ("{% for m in messages %}<{{ m.role }}>{% if m.content is string %}{{ m.content }}"
         "{% else %}{% for p in m.content %}({{ p.text }}){% endfor %}{% endif %}{% endfor %}")
CHATS = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return PromptTokenizer(str(tiny_model_dir))


def show(tok, view, **cfg) -> str:
    return render(tok.tok, TemplateConfig(SHOW, **cfg), view)


def test_the_configured_template_and_its_default_kwargs_are_rendered(tok):
    assert show(tok, {"messages": CHATS}) == "<system>Be terse.<user>Hi<assistant>"
    assert show(tok, {"messages": CHATS}, kwargs={"persona": "pirate"}).endswith("[persona=pirate]<assistant>")
    # the request's kwargs over the server's defaults; its own fields over both
    view = {"messages": CHATS, "chat_template_kwargs": {"persona": "clerk", "add_generation_prompt": True},
            "add_generation_prompt": False}
    assert show(tok, view, kwargs={"persona": "pirate"}) == "<system>Be terse.<user>Hi[persona=clerk]"
    # a None or "auto" value does not override (vLLM's merge_kwargs)
    assert "[persona=pirate]" in show(tok, {"messages": CHATS, "chat_template_kwargs": {"persona": "auto"}},
                                      kwargs={"persona": "pirate"})


def test_reasoning_effort_sets_enable_thinking_unless_the_kwargs_do(tok):
    assert "[thinking=False]" in show(tok, {"messages": CHATS, "reasoning_effort": "none"})
    assert "[thinking=True]" in show(tok, {"messages": CHATS, "reasoning_effort": "high"})
    view = {"messages": CHATS, "reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}}
    assert "[thinking=False]" in show(tok, view)
    assert "[docs=2]" in show(tok, {"messages": CHATS, "documents": [{"title": "a"}, {"title": "b"}]})


def test_text_parts_are_joined_by_newlines_and_images_left_out(tok):
    parts = [{"type": "text", "text": "Hello"}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "input_text", "text": "world"}]
    assert show(tok, {"messages": [{"role": "user", "content": parts}]}) == "<user>Hello\nworld<assistant>"


def test_a_template_that_loops_over_parts_gets_parts(tok):
    assert content_format(PARTS) == "openai" and content_format(SHOW) == "string"
    view = {"messages": [{"role": "user", "content": "a"},
                         {"role": "user", "content": [{"type": "text", "text": "b"}, {"type": "text", "text": "c"}]}]}
    assert render(tok.tok, TemplateConfig(PARTS), view) == "<user>(a)<user>(b)(c)"
    # the config can say which, as vLLM's --chat-template-content-format does
    assert render(tok.tok, TemplateConfig(PARTS, content_format="string"), view) == "<user>a<user>b\nc"


def test_developer_messages_become_one_system_message_first(tok):
    view = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                         {"role": "developer", "content": "D"}]}
    assert show(tok, view) == "<system>S\n\nD<user>U<assistant>"
    # a template that names the role gets it as it is
    named = SHOW.replace("{% for m", "{# 'developer' #}{% for m")
    assert render(tok.tok, TemplateConfig(named), view) == "<system>S<user>U<developer>D<assistant>"


def test_continue_final_message_leaves_the_last_message_open(tok):
    view = {"messages": [*CHATS, {"role": "assistant", "content": "Seven is"}], "add_generation_prompt": False,
            "continue_final_message": True}
    assert tok.render_chat(view).endswith("<|im_start|>assistant\nSeven is")


def test_a_request_template_needs_trust(tok):
    view = {"messages": CHATS, "chat_template": "{{ messages[0]['content'] }}"}
    with pytest.raises(InvalidRequest) as err:
        render(tok.tok, TemplateConfig(), view)
    assert err.value.param == "chat_template" and "trust_request_chat_template" in str(err.value)
    assert render(tok.tok, TemplateConfig(trust_request=True), view) == "Be terse."


async def test_keys_follow_the_rendering(tok):
    """A chat with and without the generation prompt: one prompt token count each, as rendered."""
    prefixer = Prefixer(tok, 256, template=TemplateConfig(SHOW))
    keys = [await prefixer.keys({"messages": CHATS, "add_generation_prompt": flag}, 4) for flag in (True, False)]
    rendered = [tok.encode_text(show(tok, {"messages": CHATS, "add_generation_prompt": f})) for f in (True, False)]
    assert [k.prompt_tokens for k in keys] == [len(r) for r in rendered] and rendered[0] != rendered[1]


# ---- config -------------------------------------------------------------------------------


def pool(tiny_model_dir, **keys) -> dict:
    return {"models": [{"name": "m", "workers": ["http://a:1"], "tokenizer": str(tiny_model_dir), **keys}]}


def test_config_takes_a_file_or_the_template_itself(tiny_model_dir, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(SHOW)
    for value in (str(path), SHOW):
        m = config_from_dict(pool(tiny_model_dir, chat_template=value, chat_template_kwargs={"persona": "p"},
                                  chat_template_content_format="string", trust_request_chat_template=True)).models[0]
        assert (m.chat_template, m.chat_template_kwargs, m.chat_template_content_format,
                m.trust_request_chat_template) == (value, {"persona": "p"}, "string", True)


@pytest.mark.parametrize("keys, where, says", [
    ({"chat_template": "/no/such/template.jinja"}, "chat_template", "no such file"),
    ({"chat_template": "{% for m in messages %}"}, "chat_template", "does not compile"),
    ({"chat_template_kwargs": ["x"]}, "chat_template_kwargs", ""),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize", "not a template variable"),
    ({"chat_template_content_format": "html"}, "chat_template_content_format", "openai"),
    ({"trust_request_chat_template": "yes"}, "trust_request_chat_template", ""),
])
def test_config_errors_name_the_key(tiny_model_dir, keys, where, says):
    with pytest.raises(ConfigError) as err:
        config_from_dict(pool(tiny_model_dir, **keys))
    assert err.value.key == f"models[0].{where}" and says in str(err.value)


def test_template_keys_need_the_tokenizer():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"models": [{"name": "m", "workers": ["http://a:1"], "chat_template": SHOW}]})
    assert err.value.key == "models[0].chat_template" and "tokenizer" in str(err.value)


def test_a_path_is_checked_only_on_the_machine_it_is_for(tiny_model_dir):
    from kvroute.router.secrets import Local

    cfg = config_from_dict(pool(tiny_model_dir, chat_template="/etc/kvroute/template.jinja"), local=Local(False))
    assert cfg.models[0].chat_template == "/etc/kvroute/template.jinja"


# ---- requests -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, fields, param", [
    (CHAT, {"chat_template_kwargs": "x"}, "chat_template_kwargs"),
    (CHAT, {"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize"),
    (CHAT, {"chat_template_kwargs": {"chat_template": "{{ x }}"}}, "chat_template_kwargs.chat_template"),
    (CHAT, {"add_generation_prompt": "no"}, "add_generation_prompt"),
    (CHAT, {"add_generation_prompt": True, "continue_final_message": True}, "continue_final_message"),
    (CHAT, {"documents": [1]}, "documents"),
    (CHAT, {"reasoning_effort": 3}, "reasoning_effort"),
    (CHAT, {"chat_template": 3}, "chat_template"),
    (EMBEDDING, {"continue_final_message": 1}, "continue_final_message"),
    (RESPONSES, {"chat_template_kwargs": []}, "chat_template_kwargs"),
    (RESPONSES, {"reasoning": "high"}, "reasoning"),
    (MESSAGES, {"output_config": 1}, "output_config"),
])
def test_bad_template_fields_are_a_400_naming_them(kind, fields, param):
    body = {"model": "m", "messages": CHATS, "input": CHATS[1:], **fields}
    if kind in (MESSAGES, COUNT_TOKENS):
        body["messages"] = [{"role": "user", "content": "Hi"}]
    if kind == EMBEDDING:
        del body["input"]
    with pytest.raises(InvalidRequest) as err:
        parse_request(kind, orjson.dumps(body), {})
    assert err.value.param == param


def test_other_apis_pass_their_template_fields_on():
    def view(kind, **body):
        return parse_request(kind, orjson.dumps({"model": "m", **body}), {}).prompt_view

    partial = {"type": "message", "role": "assistant", "content": "Seven is", "status": "incomplete"}
    responses = view(RESPONSES, input=[{"role": "user", "content": "Hi"}, partial], reasoning={"effort": "low"},
                     chat_template_kwargs={"persona": "p"})
    assert (responses["add_generation_prompt"], responses["continue_final_message"], responses["reasoning_effort"],
            responses["chat_template_kwargs"]) == (False, True, "low", {"persona": "p"})
    assert "continue_final_message" not in view(RESPONSES, input="Hi")
    messages = view(MESSAGES, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                    output_config={"effort": "high"}, chat_template_kwargs={"persona": "p"})
    assert (messages["reasoning_effort"], messages["chat_template_kwargs"]) == ("high", {"persona": "p"})


async def test_an_untrusted_request_template_is_a_400_from_the_router(aiohttp_client, upstream, tiny_model_dir):
    cfg = config_from_dict({"models": [{"name": "tiny", "workers": [worker_url(upstream)],
                                        "tokenizer": str(tiny_model_dir)}], "health": {"interval_s": 60}})
    client = await aiohttp_client(create_app(cfg))
    resp = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHATS,
                                                           "chat_template": "{{ messages }}"})
    body = await resp.json()
    assert resp.status == 400 and body["error"]["param"] == "chat_template"
    ok = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHATS,
                                                         "add_generation_prompt": False})
    assert ok.status == 200


def test_tool_calls_reach_the_template_with_object_arguments(tok):
    calls = ("{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.arguments | tojson }};"
             "{% endfor %}{% endfor %}")
    view = {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"b": 1, "a": [2]}'}},
        {"id": "b", "type": "function", "function": {"name": "f", "arguments": "not json"}},
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}},
        {"id": "d", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]}]}
    assert render(tok.tok, TemplateConfig(calls), view) == '{"b": 1, "a": [2]};{};{};{"x": 1};'
    assert view["messages"][0]["tool_calls"][0]["function"]["arguments"] == '{"b": 1, "a": [2]}'  # left as sent


def test_tools_are_written_as_vllm_dumps_them(tok):
    dump = "{% for t in tools %}{{ t | tojson }};{% endfor %}"
    view = {"messages": CHATS, "tools": [
        {"type": "function", "function": {"name": "bare"}},
        {"type": "function", "defer_loading": True, "extra": 1,
         "function": {"name": "f", "strict": True, "parameters": {"b": 1}, "extra": 2}}]}
    assert render(tok.tok, TemplateConfig(dump), view) == (
        '{"type": "function", "function": {"name": "bare", "description": null, "parameters": null}};'
        '{"type": "function", "function": {"name": "f", "description": null, "parameters": {"b": 1}, '
        '"strict": true, "defer_loading": true}, "defer_loading": true};')
