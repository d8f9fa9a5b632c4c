"""A prompt's token ids as vLLM tokenizes it, with the request's ``add_special_tokens``,
``truncate_prompt_tokens`` and ``truncation_side`` (vllm/renderers/params.py), on the tiny
model's tokenizer made to add a BOS token as Llama's does. The same tokenizer encoding with
the same arguments is the reference: vLLM calls it so."""

from __future__ import annotations

import pytest

from kvroute.router.local.tinymodel import build_tiny_bos_tokenizer
from kvroute.router.prefix import Prefixer, PromptTokenizer, chain_keys
from kvroute.router.requests import pooled_view

BLOCK = 4
TEXT = "The quick brown fox jumps over the lazy dog, and the router keys every block of it."
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": TEXT}]


@pytest.fixture(scope="module")
def tok() -> PromptTokenizer:
    return PromptTokenizer(str(build_tiny_bos_tokenizer()))


def ids(tok: PromptTokenizer, view: dict) -> tuple[int, ...]:
    """The keys of ``view`` in blocks of one token: equal keys, equal token ids."""
    keys = Prefixer(tok, chunk_chars=64).keys_sync(view, 1)
    assert keys.exact
    return keys.block_keys


def keyed(token_ids: list[int]) -> tuple[int, ...]:
    return tuple(chain_keys(token_ids, 1))


def hf(tok: PromptTokenizer, text: str, **kwargs) -> list[int]:
    return list(tok.tok(text, **kwargs).input_ids)


def test_the_bos_tokenizer_adds_one_token_in_front(tok):
    assert tok.special_prefix == [tok.tok.bos_token_id]
    assert hf(tok, TEXT) == tok.special_prefix + hf(tok, TEXT, add_special_tokens=False)


def test_a_completion_gets_the_bos_unless_it_asks_not_to(tok):
    assert ids(tok, {"prompt": TEXT}) == keyed(hf(tok, TEXT))
    assert ids(tok, {"prompt": [TEXT, "another"]}) == keyed(hf(tok, TEXT))
    assert ids(tok, {"prompt": TEXT, "add_special_tokens": False}) == keyed(hf(tok, TEXT, add_special_tokens=False))
    # a client that writes the BOS itself and turns the tokenizer's off: the same ids, the same keys
    written = tok.tok.bos_token + TEXT
    assert ids(tok, {"prompt": written, "add_special_tokens": False}) == ids(tok, {"prompt": TEXT})
    assert ids(tok, {"prompt": written}) != ids(tok, {"prompt": TEXT})  # two BOS tokens
    token_ids = hf(tok, TEXT, add_special_tokens=False)
    assert ids(tok, {"prompt": token_ids}) == keyed(token_ids)  # ids are sent as they are
    assert ids(tok, {"prompt": [token_ids]}) == keyed(token_ids)


def test_a_chat_gets_the_bos_only_if_it_asks(tok):
    rendered = tok.render_chat({"messages": CHAT})
    plain = keyed(hf(tok, rendered, add_special_tokens=False))
    assert ids(tok, {"messages": CHAT}) == ids(tok, {"messages": CHAT, "add_special_tokens": False}) == plain
    assert ids(tok, {"messages": CHAT, "add_special_tokens": True}) == keyed(hf(tok, rendered))


def truncated_while_encoding(tok: PromptTokenizer, text: str, keep: int, side: str, **kwargs) -> list[int]:
    """What vLLM's tokenizer gives: it truncates from ``side`` ("left" for generation,
    "right" for pooling, whatever the tokenizer's own config says) as it encodes."""
    before = tok.tok.truncation_side
    tok.tok.truncation_side = side
    try:
        return hf(tok, text, truncation=True, max_length=keep, **kwargs)
    finally:
        tok.tok.truncation_side = before


@pytest.mark.parametrize("keep", [1, 2, 5, 17])
def test_truncation_keeps_what_vllm_keeps(tok, keep):
    whole = hf(tok, TEXT)
    assert len(whole) > keep
    # no side said: vLLM's tokenizer truncates a generation prompt from the left, keeping its BOS
    unsaid = truncated_while_encoding(tok, TEXT, keep, "left")
    assert (unsaid[0], len(unsaid)) == (tok.tok.bos_token_id, keep)
    assert ids(tok, {"prompt": TEXT, "truncate_prompt_tokens": keep}) == keyed(unsaid)
    assert ids(tok, {"prompt": TEXT, "truncate_prompt_tokens": keep, "truncation_side": "right"}) == keyed(whole[:keep])
    assert ids(tok, {"prompt": TEXT, "truncate_prompt_tokens": keep, "truncation_side": "left"}) == \
        keyed(whole[-keep:])
    token_ids = hf(tok, TEXT, add_special_tokens=False)
    for side in ("left", None):
        view = {"prompt": token_ids, "truncate_prompt_tokens": keep, **({"truncation_side": side} if side else {})}
        assert ids(tok, view) == keyed(token_ids[-keep:])
    rendered = tok.render_chat({"messages": CHAT})
    assert ids(tok, {"messages": CHAT, "truncate_prompt_tokens": keep}) == \
        keyed(truncated_while_encoding(tok, rendered, keep, "left", add_special_tokens=False))


@pytest.mark.parametrize("keep", [None, -1, 0, 1000, "5", 2.0, True])
def test_no_truncation_where_there_is_nothing_to_cut_or_the_router_cannot_know(tok, keep):
    """-1 is the model's length, which only the worker knows; other forms the worker refuses."""
    assert ids(tok, {"prompt": TEXT, "truncate_prompt_tokens": keep}) == keyed(hf(tok, TEXT))


def test_the_pooling_apis_pass_the_fields_on_and_truncate_from_the_right(tok):
    body = {"input": TEXT, "add_special_tokens": False, "truncate_prompt_tokens": 3, "truncation_side": "left"}
    assert ids(tok, pooled_view(body)) == keyed(hf(tok, TEXT, add_special_tokens=False)[-3:])
    unsaid = pooled_view({"input": TEXT, "truncate_prompt_tokens": 3})  # the pooling runner's side
    assert ids(tok, unsaid) == keyed(truncated_while_encoding(tok, TEXT, 3, "right"))
    conversation = pooled_view({"messages": CHAT, "add_special_tokens": True})
    assert ids(tok, conversation) == keyed(hf(tok, tok.render_chat({"messages": CHAT, "add_generation_prompt": False})))


def test_truncated_prompts_key_their_own_blocks(tok):
    """A prompt cut from the left shares no block with the whole one; cut from the right, its
    blocks are the whole one's first."""
    prefixer = Prefixer(tok, chunk_chars=64)
    whole = prefixer.keys_sync({"prompt": TEXT}, BLOCK).block_keys
    cut = {"prompt": TEXT, "truncate_prompt_tokens": 9}
    left = prefixer.keys_sync(cut, BLOCK).block_keys
    right = prefixer.keys_sync({**cut, "truncation_side": "right"}, BLOCK).block_keys
    assert len(left) == len(right) == 2 and right == whole[:2] and not set(left) & set(whole)
