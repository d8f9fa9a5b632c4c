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
    text = tok.render_chat({"messages": messages})
    whole = tok.tok(text, add_special_tokens=False).input_ids
    assert tok.chat_ids(messages) == whole


def test_pieces_encode_as_the_hf_tokenizer_does(tok):
    """Pieces go straight to the Rust tokenizer; the ids must be the HF wrapper's."""
    assert tok._rust is not None
    texts = ["plain words", "  leading and trailing  ", "tabs\tand\nnewlines\n\n", "numbers 12345 3.14 -7",
             "unicode: café naïve 東京 🚀", "symbols {\"json\": [1, 2]} <tag/> a+b=c", "", " ", "x" * 3000]
    for text in texts:
        assert tok._encode_piece(text).tolist() == tok.tok(text, add_special_tokens=False).input_ids, text


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


# ---- threads: the loop and the tokenizer executor share one PromptTokenizer ---------------

def test_the_piece_cache_is_safe_across_threads(tiny_model_dir, monkeypatch):
    """Threads on a tiny LRU whose lookups yield to other threads: without the lock, an
    entry found by get() was evicted by another thread before move_to_end() (KeyError, and
    the request silently went to approximate routing). Every call must succeed."""
    import random
    import time
    from collections import OrderedDict
    from concurrent.futures import ThreadPoolExecutor

    from kvroute.router import prefix

    class YieldingDict(OrderedDict):
        def get(self, key, default=None):
            value = super().get(key, default)
            time.sleep(0.0005)  # another thread runs between the lookup and what follows
            return value

    monkeypatch.setattr(prefix, "PIECE_CACHE_SIZE", 2)
    tok = PromptTokenizer(str(tiny_model_dir))
    tok._pieces = YieldingDict()
    pieces = [f"piece {i} of a shared prompt " * 3 for i in range(4)]
    expected = {p: tok.tok(p, add_special_tokens=False).input_ids for p in pieces}

    def work(seed: int) -> int:
        rnd = random.Random(seed)
        return sum(tok._encode_piece(p).tolist() != expected[p] for p in (rnd.choice(pieces) for _ in range(60)))

    with ThreadPoolExecutor(6) as ex:
        assert sum(ex.map(work, range(6))) == 0  # and nothing raised
    assert len(tok._pieces) <= 2


def test_the_tokenizer_can_be_shared_by_threads(tok):
    """HF fast tokenizers raise "Already borrowed" when a call changes truncation or padding
    while another thread encodes; the router's calls change neither."""
    from concurrent.futures import ThreadPoolExecutor

    conversations = [[{"role": "system", "content": f"System prompt {i % 5}. " * 200},
                      {"role": "user", "content": f"question {i} " * (1 + i % 30)}] for i in range(64)]
    expected = [tok.tok(tok.render_chat({"messages": c}), add_special_tokens=False).input_ids for c in conversations]
    with ThreadPoolExecutor(8) as ex:
        assert list(ex.map(tok.chat_ids, conversations)) == expected


# ---- fallbacks to approximate routing are counted and logged ---------------------------

class BrokenTokenizer:
    """Its chat template rejects every conversation; its encoder fails on 'boom'."""

    special_prefix: list[int] = []

    def render_chat(self, view, template):
        raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")

    def completion_ids(self, prompt, add_special_tokens=True):
        if "boom" in prompt:
            raise RuntimeError("tokenizer exploded")
        return [1, 2, 3]


def fallbacks(metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("kvroute_prefix_fallbacks_total",
                                             {"model": "llama/small", "reason": reason}) or 0.0


async def test_every_fallback_is_counted_and_logged_at_most_once_a_minute(caplog):
    from kvroute.router.metrics import RouterMetrics
    from tests.clock import FakeClock

    metrics, clock = RouterMetrics(), FakeClock()
    p = Prefixer(BrokenTokenizer(), 64, model="llama/small", metrics=metrics, now=clock.time)  # type: ignore[arg-type]
    chat = {"messages": [{"role": "user", "content": "hi " * 100}]}
    with caplog.at_level("WARNING", "kvroute.router.prefix"):
        for _ in range(3):
            keys = await p.keys(chat, 16)
            assert not keys.exact and keys.block_keys  # routed, approximately
        clock.advance(61)
        await p.keys(chat, 16)
        assert not (await p.keys({"prompt": "boom " * 100}, 16)).exact
        assert (await p.keys({"prompt": "fine"}, 16)).exact
    assert fallbacks(metrics, "template") == 4 and fallbacks(metrics, "tokenizer") == 1
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 3
    assert "chat template failed: ValueError: Conversation roles must alternate" in logged[0]
    assert "(2 more since the last report)" in logged[1]
    assert "tokenization failed: RuntimeError: tokenizer exploded" in logged[2]


async def test_a_long_prompt_goes_to_the_executor_only_when_much_of_it_is_new(tok):
    from concurrent.futures import ThreadPoolExecutor

    from kvroute.router.prefix import EXECUTOR_THRESHOLD_CHARS, Prefixer

    class Counting(ThreadPoolExecutor):
        calls = 0

        def submit(self, fn, /, *args, **kwargs):
            Counting.calls += 1
            return super().submit(fn, *args, **kwargs)

    with Counting(1) as ex:
        p = Prefixer(tok, 256, ex)
        system = {"role": "system", "content": "Long shared instructions, word by word. " * 300}
        assert len(system["content"]) > 2 * EXECUTOR_THRESHOLD_CHARS
        body = {"messages": [system, {"role": "user", "content": "first question"}]}
        first = await p.keys(body, 32)
        assert Counting.calls == 1  # all of it new: tokenized off the loop
        again = await p.keys({"messages": [system, {"role": "user", "content": "second question"}]}, 32)
        assert Counting.calls == 1  # only the short new turn: inline
        assert first.exact and again.exact and first.block_keys[:10] == again.block_keys[:10]
        assert again == p.keys_sync({"messages": [system, {"role": "user", "content": "second question"}]}, 32)


def test_the_tokenizer_loads_without_torch(tiny_model_dir):
    """AutoTokenizer's import pulls in torch (~400 MB); a router without the classifier
    must not carry it."""
    import subprocess
    import sys

    code = ("import sys; from kvroute.router.app import create_app; from kvroute.router.prefix import "
            f"PromptTokenizer; t = PromptTokenizer({str(tiny_model_dir)!r}); "
            "t.chat_ids([{'role': 'user', 'content': 'hi'}]); t.completion_ids('hi'); "
            "print(sorted(m for m in ('torch', 'sentence_transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_chain_keys_match_a_block_by_block_reference():
    import random
    from array import array

    import xxhash

    def reference(ids, block_size, parent=0):
        keys = []
        for start in range(0, len(ids) - len(ids) % block_size, block_size):
            block = array("I", ids[start:start + block_size]).tobytes()
            parent = xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") + block)
            keys.append(parent)
        return keys

    rng = random.Random(0)
    for n in (0, 5, 31, 32, 33, 1083):
        for block_size in (16, 32, 128):
            ids = [rng.randrange(2**31) for _ in range(n)]
            assert chain_keys(ids, block_size, 7) == reference(ids, block_size, 7)
