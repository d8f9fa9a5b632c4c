import pytest

from kvroute.router.prefix import Prefixer, PromptTokenizer, chain_keys, text_chunk_keys


def test_chain_keys_hash_only_full_blocks():
    assert len(chain_keys(list(range(47)), 16)) == 2
    assert chain_keys([], 16) == []


def test_equal_keys_mean_equal_whole_prefixes():
    a = chain_keys([1] * 16 + [2] * 16 + [3] * 16, 16)
    b = chain_keys([1] * 16 + [2] * 16 + [4] * 16, 16)
    c = chain_keys([9] * 16 + [2] * 16 + [3] * 16, 16)
    assert a[:2] == b[:2] and a[2] != b[2]
    # The same block after a different parent gets a different key (it is a chain).
    assert a[1] != c[1] and a[2] != c[2]


def test_text_chunk_keys_are_a_chain_too():
    a = text_chunk_keys("x" * 100 + "y" * 100, 50)
    b = text_chunk_keys("x" * 100 + "z" * 100, 50)
    assert len(a) == 4 and a[:2] == b[:2] and a[2] != b[2]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return PromptTokenizer(str(tiny_model_dir))


def test_chat_ids_equal_the_template_rendered_and_tokenized_whole(tok):
    messages = [
        {"role": "system", "content": "You are a careful assistant. " * 40},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": [{"type": "text", "text": "And 3 + 3?"}]},
    ]
    text = tok.render_chat(messages, None)
    whole = tok.tok(text, add_special_tokens=False).input_ids
    assert tok.chat_ids(messages) == whole


def test_growing_conversation_reuses_cached_pieces(tok):
    system = {"role": "system", "content": "Shared instructions. " * 50}
    tok.chat_ids([system, {"role": "user", "content": "first"}])
    cached = len(tok._pieces)
    tok.chat_ids([system, {"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                  {"role": "user", "content": "second"}])
    # Only the new messages' pieces were tokenized.
    assert len(tok._pieces) - cached <= 4


async def test_prefixer_exact_and_approximate_modes(tok):
    body = {"model": "m", "messages": [{"role": "system", "content": "abc " * 300},
                                       {"role": "user", "content": "hi"}]}
    exact = await Prefixer(tok, 64).keys(body, 32)
    approx = await Prefixer(None, 64).keys(body, 32)
    assert exact.exact and not approx.exact
    assert exact.prompt_tokens == len(tok.chat_ids(body["messages"]))
    assert len(exact.block_keys) == exact.prompt_tokens // 32
    assert approx.block_size == 16 and len(approx.block_keys) > 0


async def test_prefixer_completions_accept_all_prompt_shapes(tok):
    p = Prefixer(tok, 64)
    s = await p.keys({"prompt": "hello " * 100}, 16)
    lst = await p.keys({"prompt": ["hello " * 100, "other"]}, 16)
    ids = await p.keys({"prompt": list(range(40))}, 16)
    assert s.block_keys == lst.block_keys and s.prompt_tokens > 16
    assert ids.prompt_tokens == 40 and len(ids.block_keys) == 2
