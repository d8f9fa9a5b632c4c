"""Prompt -> KV block keys.

With the model's tokenizer (exact mode) the chat template is rendered and tokenized the
way vLLM does it, and the token ids are hashed per KV block as an xxhash chain: each
block's key covers the previous block's key, so equal keys mean equal whole prefixes.
Only full blocks get a key, because vLLM only caches full blocks.

Rendered text is split at special tokens (which tokenizers never merge across) and each
piece's ids are cached, so a growing conversation tokenizes only its new messages and a
long shared system prompt is tokenized once. Ids are kept as ``array("I")``, the bytes
the block hashes read, so a cached piece is copied, not converted. A prompt with much new
text (over ``EXECUTOR_THRESHOLD_CHARS`` of uncached pieces) is tokenized in an executor,
where the Rust tokenizer runs beside the loop without the GIL; the rest inline, since the
hop costs more than a short piece. So one tokenizer serves the event loop and the
executor's threads at once: its piece cache takes a lock, and the tokenizer itself is
shared (see ``PromptTokenizer``).

A request that cannot be templated or tokenized (a chat template that rejects its
messages) is routed approximately, counted in ``kvroute_prefix_fallbacks_total`` and logged.

Without a tokenizer (approximate mode) the prompt text is hashed in fixed-size character
chunks instead. The result is still stable per prefix, but prefill-token estimates are
rough; the mode is logged and shown on ``/health``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import xxhash

from kvroute.router import chat_template
from kvroute.router.chat_template import TemplateConfig
from kvroute.router.errors import InvalidRequest
from kvroute.router.metrics import RouterMetrics

log = logging.getLogger(__name__)

EXECUTOR_THRESHOLD_CHARS = 4096  # less new text is tokenized inline: an executor hop costs more
PIECE_CACHE_SIZE = 8192
DEFAULT_TEMPLATE = TemplateConfig()
FALLBACK_LOG_INTERVAL_S = 60.0  # a client that keeps sending what the template rejects logs once a minute


def chain_keys(token_ids: Sequence[int] | array, block_size: int, parent: int = 0) -> list[int]:
    """Chained xxh3-64 keys of each full ``block_size`` block of ``token_ids``."""
    keys: list[int] = []
    if not (isinstance(token_ids, array) and token_ids.typecode == "I"):
        token_ids = array("I", token_ids)  # one conversion; each block is a slice of its bytes
    data = token_ids.tobytes()
    step = 4 * block_size
    for start in range(0, len(data) - len(data) % step, step):
        parent = xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") + data[start : start + step])
        keys.append(parent)
    return keys


def root_key(lora: str | None = None, salt: str | None = None) -> int:
    """Where a prompt's chain of keys starts: 0 for the base model without a cache salt;
    else a key of the LoRA adapter and the salt. vLLM hashes both into a prompt's blocks (the
    adapter into every one, ``cache_salt`` into the first), so their blocks never match the
    base model's, another adapter's or another salt's: nor do the keys that start here."""
    if lora is None and salt is None:
        return 0
    return xxhash.xxh3_64_intdigest(orjson.dumps(["kvroute-root", lora, salt]))


def text_chunk_keys(text: str, chunk_chars: int, parent: int = 0) -> list[int]:
    """Approximate mode: chained keys of each full ``chunk_chars`` chunk of ``text``."""
    keys: list[int] = []
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
    """The model's own tokenizer and chat template, loaded from a local folder.

    Thread-safe. The piece cache is an LRU behind a lock (its check-then-act once lost
    entries to another thread and sent the request down the approximate path). The Rust
    tokenizer is shared without one: encoding borrows it immutably, and HF fast
    tokenizers raise "Already borrowed" only when a call changes their truncation or
    padding, which these calls never ask for (tests/unit/test_prefix.py tokenizes from
    many threads at once)."""

    def __init__(self, path: str):
        self.tok = _load_tokenizer(path)
        specials = sorted(set(self.tok.all_special_tokens) | set(self.tok.get_added_vocab()), key=len, reverse=True)
        self._special_ids: dict[str, int] = {s: self._token_id(s) for s in specials}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")") if specials else None
        with_special = self.tok("x").input_ids
        without = self.tok("x", add_special_tokens=False).input_ids
        n = len(with_special) - len(without)
        # What the tokenizer adds before a text it encodes with special tokens (a BOS)
        self.special_prefix = list(with_special[:n]) if n > 0 and with_special[n:] == without else []
        # The Rust tokenizer behind the HF wrapper: the same ids for a piece without special
        # tokens, without the wrapper's per-call Python (a third of a short piece's cost).
        self._rust = getattr(self.tok, "backend_tokenizer", None)
        self._pieces: OrderedDict[str, array] = OrderedDict()
        self._pieces_lock = threading.Lock()  # held for the cache's bookkeeping, never while tokenizing

    def render_chat(self, view: Mapping[str, Any], template: TemplateConfig = DEFAULT_TEMPLATE) -> str:
        """A chat ``view`` (``messages``, ``tools`` and the template fields) as vLLM renders it."""
        return chat_template.render(self.tok, template, view)

    def _token_id(self, token: str) -> int:
        token_id = self.tok.convert_tokens_to_ids(token)
        assert isinstance(token_id, int)  # one token in, one id out
        return token_id

    def encode_text(self, text: str) -> list[int]:
        """Token ids of rendered text, as vLLM gets them (no extra special tokens)."""
        return self.encode_pieces(self.pieces(text)).tolist()

    def pieces(self, text: str) -> list[str]:
        """Rendered text cut at special tokens: what the piece cache holds."""
        return self._split.split(text) if self._split is not None else [text]

    def encode_pieces(self, pieces: list[str]) -> array:
        """Token ids of text cut by ``pieces``, as ``array("I")``."""
        ids = array("I")
        for piece in pieces:
            special = self._special_ids.get(piece)
            if special is not None:
                ids.append(special)
            elif piece:
                ids.extend(self._encode_piece(piece))
        return ids

    def _encode_piece(self, piece: str) -> array:
        with self._pieces_lock:
            cached = self._pieces.get(piece)
            if cached is not None:
                self._pieces.move_to_end(piece)
                return cached
        # Two threads may tokenize the same new piece at once; both get the same ids.
        if self._rust is not None:
            # encode_batch_fast skips the offsets and releases the GIL while it works
            ids = array("I", self._rust.encode_batch_fast([piece], add_special_tokens=False)[0].ids)
        else:
            ids = array("I", self.tok(piece, add_special_tokens=False).input_ids)
        with self._pieces_lock:
            self._pieces[piece] = ids
            self._pieces.move_to_end(piece)
            while len(self._pieces) > PIECE_CACHE_SIZE:
                self._pieces.popitem(last=False)
        return ids

    def uncached_chars(self, pieces: list[str]) -> int:
        """Characters of ``pieces`` not in the cache: what encoding them costs."""
        with self._pieces_lock:
            return sum(len(p) for p in pieces if p and p not in self._special_ids and p not in self._pieces)

    def chat_ids(self, messages: list[dict], tools: list | None = None) -> list[int]:
        return self.encode_text(self.render_chat({"messages": messages, "tools": tools}))

    def completion_ids(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return (self.special_prefix if add_special_tokens else []) + self.encode_text(prompt)


def _load_tokenizer(path: str) -> Any:
    """The model's fast tokenizer. With a ``tokenizer.json`` (every current model ships one)
    it is loaded as ``PreTrainedTokenizerFast``: importing ``AutoTokenizer`` imports torch,
    about 400 MB of a router's memory, for nothing the router uses."""
    if (Path(path) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    from transformers import AutoTokenizer  # a slow-only tokenizer: converted by transformers

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _chat_text_approx(messages: list[dict]) -> str:
    return "".join(f"<{m.get('role', '')}>{normalize_content(m.get('content'))}" for m in messages)


def _approx_text(body: dict) -> str:
    messages = body.get("messages")
    return _chat_text_approx(messages) if messages is not None else _prompt_text(body["prompt"])


class Prefixer:
    """Computes ``PromptKeys`` for one model's requests, exact or approximate.

    ``model`` labels the fallbacks it counts in ``metrics`` (the pool's key, ``model/tier``
    for a tier: each tier has its own tokenizer). ``keys_sync`` runs on the loop and in the
    executor's threads."""

    def __init__(self, tokenizer: PromptTokenizer | None, chunk_chars: int, executor: Executor | None = None,
                 *, model: str = "", metrics: RouterMetrics | None = None,
                 now: Callable[[], float] = time.monotonic, template: TemplateConfig = DEFAULT_TEMPLATE):
        self.tokenizer = tokenizer
        self.template = template  # the chat template settings of the model's vLLM servers
        self.chunk_chars = chunk_chars
        self.executor = executor
        self.model = model
        self.metrics = metrics
        self._now = now
        self._log_lock = threading.Lock()
        self._logged_at: dict[str, float] = {}  # reason -> when a fallback was last logged
        self._unlogged: dict[str, int] = {}  # reason -> fallbacks since

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def keys_sync(self, body: dict, block_size: int, root: int = 0) -> PromptKeys:
        """``root``: where the chain starts (:func:`root_key`)."""
        messages = body.get("messages")
        tok = self.tokenizer
        if tok is not None:
            ids = self._token_ids(tok, body, messages)
            if ids is not None:
                return PromptKeys(tuple(chain_keys(ids, block_size, root)), len(ids), block_size, True)
        return self._approximate(body, root)

    def estimate(self, body: dict) -> PromptKeys:
        """No block keys, and the prompt's tokens estimated (characters / 4), without a tokenizer."""
        return PromptKeys((), max(1, len(_approx_text(body)) // 4), max(1, self.chunk_chars // 4), False)

    def _approximate(self, body: dict, root: int = 0) -> PromptKeys:
        text = _approx_text(body)
        tokens_per_chunk = max(1, self.chunk_chars // 4)
        keys = text_chunk_keys(text, self.chunk_chars, root)
        return PromptKeys(tuple(keys), max(1, len(text) // 4), tokens_per_chunk, False)

    def _token_ids(self, tok: PromptTokenizer, body: dict,
                   messages: list[dict] | None) -> list[int] | array | None:
        """The prompt's token ids; None (counted and logged) when templating or tokenizing fails."""
        reason = "template"
        try:
            if messages is not None:
                text = tok.render_chat(body, self.template)
                reason = "tokenizer"
                return _chat_ids(tok, tok.encode_pieces(tok.pieces(text)), body)
            reason = "tokenizer"
            return _completion_ids(tok, body)
        except InvalidRequest:
            raise
        except Exception as exc:  # e.g. a template that rejects these messages: route approximately
            self._fallback(reason, exc)
            return None

    def _fallback(self, reason: str, exc: Exception) -> None:
        if self.metrics is not None:
            self.metrics.prefix_fallbacks.labels(self.model, reason).inc()
        now = self._now()
        with self._log_lock:  # fallbacks come from the loop and from executor threads
            last = self._logged_at.get(reason)
            if last is not None and now - last < FALLBACK_LOG_INTERVAL_S:
                self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
                return
            self._logged_at[reason] = now
            since = self._unlogged.pop(reason, 0)
        log.warning("model %s: routing a request approximately, its %s failed: %s: %s%s", self.model,
                    "chat template" if reason == "template" else "tokenization", type(exc).__name__, exc,
                    f" ({since} more since the last report)" if since else "")

    async def keys(self, body: dict, block_size: int, root: int = 0) -> PromptKeys:
        tok = self.tokenizer
        messages = body.get("messages")
        if tok is None or (messages is None and _prompt_chars(body) < EXECUTOR_THRESHOLD_CHARS):
            return self.keys_sync(body, block_size, root)
        loop = asyncio.get_running_loop()
        if messages is not None:
            # A long chat whose pieces are mostly cached (a shared system prompt, a growing
            # conversation) costs less inline than the executor hop: render it here, and go
            # to the executor only when much of it is new text to tokenize.
            try:
                text = tok.render_chat(body, self.template)
            except InvalidRequest:
                raise
            except Exception as exc:
                self._fallback("template", exc)
                return self._approximate(body, root)
            pieces = tok.pieces(text)
            if tok.uncached_chars(pieces) < EXECUTOR_THRESHOLD_CHARS:
                return self._from_pieces(tok, pieces, body, block_size, root)
            return await loop.run_in_executor(self.executor, self._from_pieces, tok, pieces, body, block_size, root)
        return await loop.run_in_executor(self.executor, self.keys_sync, body, block_size, root)

    def _from_pieces(self, tok: PromptTokenizer, pieces: list[str], body: dict, block_size: int,
                     root: int) -> PromptKeys:
        """Keys of a rendered chat; approximate (counted, logged) if tokenizing fails."""
        try:
            ids = _chat_ids(tok, tok.encode_pieces(pieces), body)
        except Exception as exc:
            self._fallback("tokenizer", exc)
            return self._approximate(body, root)
        return PromptKeys(tuple(chain_keys(ids, block_size, root)), len(ids), block_size, True)


def _chat_ids(tok: PromptTokenizer, ids: array, view: dict) -> array | list[int]:
    """A rendered chat's ids as vLLM tokenizes it: special tokens only if asked for (the
    template writes its own), and truncated as asked."""
    if "add_special_tokens" not in view and "truncate_prompt_tokens" not in view:
        return ids
    special = view.get("add_special_tokens") is True
    with_special = tok.special_prefix + ids.tolist() if special else ids.tolist()
    return _truncated(with_special, view, len(tok.special_prefix) if special else 0)


def _completion_ids(tok: PromptTokenizer, view: dict) -> list[int]:
    """A completion's first prompt as vLLM tokenizes it: a text with the tokenizer's special
    tokens unless ``add_special_tokens`` is false, token ids as they are; truncated as asked."""
    prompt = view["prompt"]
    if "items" in view:
        return _scoring_ids(tok, view)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        special = view.get("add_special_tokens") is not False
        ids = tok.completion_ids(prompt, special)
        return _truncated(ids, view, len(tok.special_prefix) if special else 0)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return _truncated(list(prompt), view, 0)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        return _truncated(list(prompt[0]), view, 0)
    return []


def _scoring_ids(tok: PromptTokenizer, view: dict) -> list[int]:
    """A generative scoring request's first prompt as vLLM builds it: the query's ids (a text
    with the tokenizer's special tokens unless ``add_special_tokens`` is false) and the first
    item's (a text without), the item first with ``item_first``."""
    query, item = view["prompt"], view["items"][0]
    query_ids = tok.completion_ids(query, view.get("add_special_tokens") is not False) if isinstance(query, str) \
        else list(query)
    item_ids = tok.encode_text(item) if isinstance(item, str) else list(item)
    return item_ids + query_ids if view.get("item_first") else query_ids + item_ids


def _truncated(ids: list[int], view: dict, specials: int) -> list[int]:
    """``ids`` cut to the request's ``truncate_prompt_tokens`` as vLLM cuts them
    (vllm/renderers/params.py): the last ones with ``truncation_side: left``, the first with
    ``right``. Without a side, vLLM's tokenizer truncates a generation prompt from the left
    as it encodes, keeping the ``specials`` it adds in front (the pooling views say
    ``right``, the pooling runner's side). -1 (the model's length, which the router does
    not know) is left to the worker."""
    keep = view.get("truncate_prompt_tokens")
    if type(keep) is not int or keep < 1 or keep >= len(ids):
        return ids
    side = view.get("truncation_side")
    if side == "left":
        return ids[-keep:]
    if side == "right":
        return ids[:keep]
    return ids[:specials] + ids[len(ids) - max(keep - specials, 0):]


def rest_of_batch_tokens(view: dict) -> int:
    """Tokens of a batch's prompts after the first, whose keys route it: counted for load and
    budgets, texts (and a chat batch's other conversations, ``batch``; a generative scoring
    request's other items, each with its query) estimated at 4 characters a token."""
    batch = view.get("batch")
    if isinstance(batch, list):
        return sum(_estimated_tokens(_chat_text_approx(c)) for c in batch)
    prompt = view.get("prompt")
    items = view.get("items")
    if isinstance(items, list):
        return sum(_estimated_tokens(prompt) + _estimated_tokens(i) for i in items[1:])
    if not isinstance(prompt, list) or len(prompt) < 2:
        return 0
    if isinstance(prompt[0], (str, list)):  # texts, or lists of token ids
        return sum(_estimated_tokens(p) for p in prompt[1:] if isinstance(p, type(prompt[0])))
    return 0  # one prompt of token ids


def _estimated_tokens(text_or_ids: Any) -> int:
    """A text's tokens at 4 characters a token; token ids counted."""
    return len(text_or_ids) // 4 + 1 if isinstance(text_or_ids, str) else len(text_or_ids)


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


def _prompt_chars(body: dict) -> int:
    prompt = body.get("prompt")
    return len(prompt) if isinstance(prompt, str) else 0
