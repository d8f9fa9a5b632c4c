"""Prompt -> KV block keys.

With the model's tokenizer (exact mode) the chat template is rendered and tokenized the
way vLLM does it, and the token ids are hashed per KV block as an xxhash chain: each
block's key covers the previous block's key, so equal keys mean equal whole prefixes.
Only full blocks get a key, because vLLM only caches full blocks.

Rendered text is split at special tokens (which tokenizers never merge across) and each
piece's ids are cached, so a growing conversation tokenizes only its new messages and a
long shared system prompt is tokenized once. Long prompts are tokenized in an executor.

Without a tokenizer (approximate mode) the prompt text is hashed in fixed-size character
chunks instead. The result is still stable per prefix, but prefill-token estimates are
rough; the mode is logged and shown on ``/health``.
"""

from __future__ import annotations

import asyncio
import re
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import xxhash

from kvroute.router.errors import InvalidRequest

EXECUTOR_THRESHOLD_CHARS = 4096  # shorter prompts are tokenized inline: an executor hop costs more
PIECE_CACHE_SIZE = 8192


def chain_keys(token_ids: Sequence[int], block_size: int, parent: int = 0) -> list[int]:
    """Chained xxh3-64 keys of each full ``block_size`` block of ``token_ids``."""
    keys: list[int] = []
    full = len(token_ids) - len(token_ids) % block_size
    for start in range(0, full, block_size):
        block = array("I", token_ids[start : start + block_size]).tobytes()
        parent = xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") + block)
        keys.append(parent)
    return keys


def text_chunk_keys(text: str, chunk_chars: int) -> list[int]:
    """Approximate mode: chained keys of each full ``chunk_chars`` chunk of ``text``."""
    keys: list[int] = []
    parent = 0
    data = text.encode("utf-8", "surrogatepass")
    full = len(data) - len(data) % chunk_chars
    for start in range(0, full, chunk_chars):
        parent = xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") + data[start : start + chunk_chars])
        keys.append(parent)
    return keys


@dataclass(frozen=True)
class PromptKeys:
    block_keys: tuple[int, ...]
    prompt_tokens: int  # exact in exact mode, estimated (chars / 4) otherwise
    block_size: int  # tokens per key (token-equivalents in approximate mode)
    exact: bool


def normalize_content(content: Any) -> str:
    """OpenAI content may be a string or a list of parts; templates expect text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise InvalidRequest("'content' must be a string or a list of content parts", param="messages")


class PromptTokenizer:
    """The model's own tokenizer and chat template, loaded from a local folder."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer  # heavy import; only when configured

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        specials = sorted(set(self.tok.all_special_tokens) | set(self.tok.get_added_vocab()), key=len, reverse=True)
        self._special_ids: dict[str, int] = {s: self._token_id(s) for s in specials}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")") if specials else None
        with_special = self.tok("x").input_ids
        without = self.tok("x", add_special_tokens=False).input_ids
        n = len(with_special) - len(without)
        self._completion_prefix = list(with_special[:n]) if n > 0 and with_special[n:] == without else []
        self._pieces: OrderedDict[str, list[int]] = OrderedDict()

    def render_chat(self, messages: list[dict], tools: list | None) -> str:
        msgs = [{**m, "content": normalize_content(m.get("content"))} for m in messages]
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
        if tools:
            kwargs["tools"] = tools
        return str(self.tok.apply_chat_template(msgs, **kwargs))

    def _token_id(self, token: str) -> int:
        token_id = self.tok.convert_tokens_to_ids(token)
        assert isinstance(token_id, int)  # one token in, one id out
        return token_id

    def encode_text(self, text: str) -> list[int]:
        """Token ids of rendered text, as vLLM gets them (no extra special tokens)."""
        if self._split is None:
            return self._encode_piece(text)
        ids: list[int] = []
        for piece in self._split.split(text):
            if not piece:
                continue
            special = self._special_ids.get(piece)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(self._encode_piece(piece))
        return ids

    def _encode_piece(self, piece: str) -> list[int]:
        cached = self._pieces.get(piece)
        if cached is not None:
            self._pieces.move_to_end(piece)
            return cached
        ids = self.tok(piece, add_special_tokens=False).input_ids
        self._pieces[piece] = ids
        if len(self._pieces) > PIECE_CACHE_SIZE:
            self._pieces.popitem(last=False)
        return ids

    def chat_ids(self, messages: list[dict], tools: list | None = None) -> list[int]:
        return self.encode_text(self.render_chat(messages, tools))

    def completion_ids(self, prompt: str) -> list[int]:
        return self._completion_prefix + self.encode_text(prompt)


def _chat_text_approx(messages: list[dict]) -> str:
    return "".join(f"<{m.get('role', '')}>{normalize_content(m.get('content'))}" for m in messages)


class Prefixer:
    """Computes ``PromptKeys`` for one model's requests, exact or approximate."""

    def __init__(self, tokenizer: PromptTokenizer | None, chunk_chars: int, executor: Executor | None = None):
        self.tokenizer = tokenizer
        self.chunk_chars = chunk_chars
        self.executor = executor

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def keys_sync(self, body: dict, block_size: int) -> PromptKeys:
        messages = body.get("messages")
        tok = self.tokenizer
        if tok is not None:
            try:
                if messages is not None:
                    ids = tok.chat_ids(messages, body.get("tools"))
                else:
                    ids = _completion_ids(tok, body["prompt"])
            except InvalidRequest:
                raise
            except Exception:  # a template that rejects this input: route approximately
                ids = None
            if ids is not None:
                return PromptKeys(tuple(chain_keys(ids, block_size)), len(ids), block_size, True)
        text = _chat_text_approx(messages) if messages is not None else _prompt_text(body["prompt"])
        tokens_per_chunk = max(1, self.chunk_chars // 4)
        keys = text_chunk_keys(text, self.chunk_chars)
        return PromptKeys(tuple(keys), max(1, len(text) // 4), tokens_per_chunk, False)

    async def keys(self, body: dict, block_size: int) -> PromptKeys:
        if self.tokenizer is None or _body_chars(body) < EXECUTOR_THRESHOLD_CHARS:
            return self.keys_sync(body, block_size)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.keys_sync, body, block_size)


def _completion_ids(tok: PromptTokenizer, prompt: Any) -> list[int]:
    if isinstance(prompt, str):
        return tok.completion_ids(prompt)
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):
            return tok.completion_ids(first)
        if isinstance(first, int):
            return list(prompt)
        if isinstance(first, list):
            return list(first)
    return []


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):
            return first
        if isinstance(first, int):
            return " ".join(map(str, prompt))
        if isinstance(first, list):
            return " ".join(map(str, first))
    return ""


def _body_chars(body: dict) -> int:
    messages = body.get("messages")
    if messages is not None:
        return sum(len(normalize_content(m.get("content"))) for m in messages if isinstance(m, dict))
    prompt = body.get("prompt")
    return len(prompt) if isinstance(prompt, str) else 0
