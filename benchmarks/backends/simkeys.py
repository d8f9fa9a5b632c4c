"""Token ids and KV block keys of chat requests, fast enough for a million simulated requests.

Two tokenizations:
- ``tiny``: the tiny model's real tokenizer and ChatML template (``router.prefix.
  PromptTokenizer``); block keys are then exactly the ones kvroute computes.
- ``words``: a cheap deterministic stand-in. Each whitespace word maps to one id (two for
  words over five characters, which tracks the tiny BPE's ~1.3 tokens per word), and each
  message is framed like ChatML. Equal text still gives equal ids, which is all prefix
  routing needs, at a fraction of the cost.

Both hash blocks with ``router.prefix.chain_keys``. Because chat messages render one
after another, a request's keys extend the keys of its message prefix; ``KeyCache``
memoizes per message prefix, so a shared system prompt or a growing conversation is
hashed once, not per request.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

import xxhash

from kvroute.router.prefix import PromptTokenizer, chain_keys, normalize_content

_IM_START, _IM_END, _NEWLINE = 1, 2, 3


class Tokenization(Protocol):
    name: str

    def message_ids(self, role: str, content: str) -> list[int]: ...

    def generation_ids(self) -> list[int]: ...


class WordIds:
    """Cheap stand-in tokenizer: stable ids per word, ChatML-like framing."""

    name = "words"

    def __init__(self, vocab: int = 2048, cache_size: int = 200_000):
        self.vocab = vocab
        self.cache_size = cache_size
        self._words: dict[str, tuple[int, ...]] = {}

    def _word(self, word: str) -> tuple[int, ...]:
        ids = self._words.get(word)
        if ids is None:
            n = 1 if len(word) <= 5 else 2
            ids = tuple(
                xxhash.xxh32_intdigest(f"{word}#{j}".encode()) % (self.vocab - 8) + 8
                for j in range(n)
            )
            if len(self._words) >= self.cache_size:
                self._words.clear()
            self._words[word] = ids
        return ids

    def message_ids(self, role: str, content: str) -> list[int]:
        ids = [_IM_START, *self._word(role), _NEWLINE]
        for w in content.split():
            ids.extend(self._word(w))
        ids += [_IM_END, _NEWLINE]
        return ids

    def generation_ids(self) -> list[int]:
        return [_IM_START, *self._word("assistant"), _NEWLINE]


class TinyIds:
    """The real tokenizer; per-message rendering equals whole-chat rendering for ChatML."""

    name = "tiny"

    def __init__(self, path: str):
        self.tok = PromptTokenizer(path)

    def message_ids(self, role: str, content: str) -> list[int]:
        return self.tok.encode_text(f"<|im_start|>{role}\n{content}<|im_end|>\n")

    def generation_ids(self) -> list[int]:
        return self.tok.encode_text("<|im_start|>assistant\n")


def make_tokenization(name: str, tokenizer_dir: str | None = None) -> Tokenization:
    if name == "words":
        return WordIds()
    if name == "tiny":
        if tokenizer_dir is None:
            from kvroute.router.local.tinymodel import build_tiny_model

            tokenizer_dir = str(build_tiny_model())
        return TinyIds(tokenizer_dir)
    raise ValueError(f"unknown tokenization {name!r}; valid: words, tiny")


class KeyCache:
    """Block keys and prompt length of chat requests, memoized per message prefix."""

    def __init__(self, tokenization: Tokenization, block_size: int, max_entries: int = 50_000):
        self.tok = tokenization
        self.block_size = block_size
        self.max_entries = max_entries
        # message-prefix hash -> (keys of full blocks, ids after the last full block, tokens)
        self._states: OrderedDict[int, tuple[tuple[int, ...], list[int], int]] = OrderedDict()
        self.hashed_blocks = 0  # work done, for the curious

    def _extend(
        self, state: tuple[tuple[int, ...], list[int], int], ids: list[int]
    ) -> tuple[tuple[int, ...], list[int], int]:
        keys, tail, n = state
        tail = tail + ids
        full = len(tail) - len(tail) % self.block_size
        if full:
            new = chain_keys(tail[:full], self.block_size, keys[-1] if keys else 0)
            self.hashed_blocks += len(new)
            keys = keys + tuple(new)
            tail = tail[full:]
        return keys, tail, n + len(ids)

    def keys(self, messages: list[dict]) -> tuple[tuple[int, ...], int]:
        """(block keys, prompt tokens) of a chat request with the generation prompt."""
        hashes: list[int] = []
        h = 0
        for m in messages:
            h = xxhash.xxh3_64_intdigest(
                f"{h}\x00{m.get('role', '')}\x00{normalize_content(m.get('content'))}".encode()
            )
            hashes.append(h)
        state: tuple[tuple[int, ...], list[int], int] = ((), [], 0)
        start = 0
        for i in range(len(hashes) - 1, -1, -1):
            cached = self._states.get(hashes[i])
            if cached is not None:
                self._states.move_to_end(hashes[i])
                state, start = cached, i + 1
                break
        for i in range(start, len(messages)):
            m = messages[i]
            state = self._extend(
                state, self.tok.message_ids(m.get("role", ""), normalize_content(m.get("content")))
            )
            self._states[hashes[i]] = state
            if len(self._states) > self.max_entries:
                self._states.popitem(last=False)
        keys, _, n = self._extend(state, self.tok.generation_ids())
        return keys, n
