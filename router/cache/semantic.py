"""The semantic cache: a stored answer for a reworded repeat of a question.

    probe:  the request's last user turn (the prompt, for /v1/completions) and a context
            signature: SHA-256 over the model, a forced tier and the rest of the request
            (earlier messages, system prompt, tools, sampling fields, ``max_tokens``
            rounded up to a power of two) with that turn left out. Requests whose last
            turn is not plain text, or longer than the encoder's 512 tokens, are bypassed.
    embed:  MiniLM's embedding layer (classifier/encoder.py, numpy), in this cache's own
            one-thread executor, over the turn lower-cased with whitespace and closing
            punctuation normalised.
    lookup: the nearest stored turns of the same tenant, model and signature
            (semantic_index.py); the first at or above ``threshold`` that passes the
            near-opposite check (semantic_check.py) and whose answer is still in the
            store is a hit.
    store:  after a miss, the answer goes into the response-cache store (store.py) under
            its own key with ``ttl_s``, and the turn's vector into the index.

With Redis, every stored vector is also appended to a Redis stream (``<prefix>:s:log``,
capped at the models' ``max_entries``); each replica reads the stream at start-up and
then every ``sync_interval_s``, so a replica serves an entry another added within one
interval plus a round trip. The answers themselves are in Redis already (the store).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import unicodedata
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from redis.exceptions import RedisError

from kvroute.router.cache import replay
from kvroute.router.cache.config import SemanticCacheConfig
from kvroute.router.cache.policy import canonical
from kvroute.router.cache.semantic_check import conflict
from kvroute.router.cache.semantic_index import SemanticIndex, Stored
from kvroute.router.cache.store import RedisStore, Store, StoreDown
from kvroute.router.governance.clock import Clock
from kvroute.router.metrics import RouterMetrics
from kvroute.router.requests import CHAT, ParsedRequest

log = logging.getLogger(__name__)
MAX_TOKENS = 512  # MiniLM's positions: a longer turn would be embedded truncated, so it is bypassed
DIM = 384
CANDIDATES = 4  # nearest entries tried in turn when a closer one fails the check
_CLOSING = re.compile(r"[\s?.!。？！]+$")


@dataclass(frozen=True)
class Probe:
    namespace: str
    signature: str
    text: str  # the last user turn as sent (the check reads its case and numbers)
    vector: np.ndarray

    @property
    def key(self) -> str:
        """The answer's key in the store: one entry per tenant, context and normalised turn."""
        h = hashlib.sha256()
        for part in (self.namespace, self.signature, normalise(self.text)):
            h.update(len(part.encode()).to_bytes(4, "big") + part.encode())
        return "sem-" + h.hexdigest()


@dataclass(frozen=True)
class Found:
    entry: replay.Entry
    similarity: float


def last_turn(req: ParsedRequest) -> str | None:
    """The text a semantic lookup compares: the last user turn, or the completion prompt."""
    if req.kind != CHAT:
        prompt = req.body.get("prompt")
        return prompt if isinstance(prompt, str) and prompt.strip() else None
    messages = req.body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], Mapping):
        return None
    last = messages[-1]
    if last.get("role") != "user":
        return None
    content = last.get("content")
    if isinstance(content, list):  # parts: text only (an image is not embedded)
        if not all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            return None
        content = "\n".join(p["text"] for p in content)
    return content if isinstance(content, str) and content.strip() else None


def signature(req: ParsedRequest, model: str, tier: str | None) -> str:
    """Everything but the last turn that changes the answer must match exactly."""
    body: dict[str, Any] = {k: v for k, v in req.body.items() if k not in ("stream", "stream_options", "user")}
    if req.kind == CHAT:
        body["messages"] = [*body["messages"][:-1], {k: v for k, v in body["messages"][-1].items() if k != "content"}]
    else:
        body["prompt"] = None
    for field in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(field), int) and body[field] > 0:
            body[field] = 1 << (body[field] - 1).bit_length()  # a bucket: 100 and 120 ask for the same answer
    h = hashlib.sha256()
    for part in (model.encode(), (tier or "").encode()):
        h.update(len(part).to_bytes(4, "big") + part)
    h.update(canonical(body))
    return h.hexdigest()


def normalise(text: str) -> str:
    """What is embedded: case, spacing and closing punctuation do not change a question."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _CLOSING.sub("", " ".join(text.split()))


class Embedder:
    """MiniLM's embedding layer (numpy); call it in an executor. None for a turn too long."""

    def __init__(self) -> None:
        from kvroute.classifier.encoder import EmbeddingLayer

        self.layer = EmbeddingLayer(MAX_TOKENS)

    def __call__(self, text: str) -> np.ndarray | None:
        text = normalise(text)
        if self.layer.token_count(text) > MAX_TOKENS:
            return None
        return self.layer([text])[0]


class SemanticCache:
    def __init__(self, cfgs: Mapping[str, SemanticCacheConfig], store: Store, metrics: RouterMetrics,
                 clock: Clock | None = None, embedder: Embedder | None = None):
        self.cfgs = dict(cfgs)
        self.store = store
        self.metrics = metrics
        self.clock = clock or Clock()
        self.indexes = {model: SemanticIndex(DIM, cfg.max_entries, self.clock) for model, cfg in self.cfgs.items()}
        self.embedder = embedder
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvroute-semantic")
        self.redis = store if isinstance(store, RedisStore) else None
        self.log_key = f"{self.redis.prefix}:s:log" if self.redis is not None else ""
        self.last_id = "0-0"  # the stream position this replica has read up to
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Load the encoder (off the loop), read what other replicas stored, start syncing."""
        if self.embedder is None:
            self.embedder = await asyncio.get_running_loop().run_in_executor(self.executor, Embedder)
        if self.redis is not None:
            await self.sync()
            self._task = asyncio.create_task(self._sync_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def probe(self, req: ParsedRequest, model: str, namespace: str) -> Probe | None:
        """The request's turn, embedded; None when it cannot be looked up semantically."""
        text = last_turn(req)
        if text is None or self.embedder is None:
            return None
        vector = await asyncio.get_running_loop().run_in_executor(self.executor, self.embedder, text)
        if vector is None:
            return None
        return Probe(namespace, signature(req, model, req.headers.get("x-kvroute-tier")), text, vector)

    async def lookup(self, model: str, probe: Probe) -> Found | None:
        cfg = self.cfgs[model]
        index = self.indexes[model]
        for similarity, stored in index.search(probe.namespace, probe.signature, probe.vector, CANDIDATES):
            if similarity < cfg.threshold:
                break
            reason = conflict(probe.text, stored.text)
            if reason is not None:
                self.metrics.cache_semantic_vetoes.labels(model, reason).inc()
                continue
            raw = await self.store.get(stored.key)  # StoreDown: the caller's miss
            entry = replay.Entry.decode(raw) if raw is not None else None
            if entry is None:  # expired or evicted from the store
                index.remove(stored.key)
                continue
            return Found(entry, similarity)
        return None

    async def add(self, model: str, probe: Probe, raw: bytes) -> None:
        """Store a miss's answer (encoded ``replay.Entry``) for later paraphrases."""
        cfg = self.cfgs[model]
        await self.store.set(probe.key, raw, cfg.ttl_s)
        expires_at = self.clock.time() + cfg.ttl_s
        self._insert(model, probe.namespace, probe.signature, Stored(probe.key, probe.text, probe.vector, expires_at))
        if self.redis is not None:
            fields = {"m": model, "n": probe.namespace, "s": probe.signature, "k": probe.key, "t": probe.text,
                      "e": repr(expires_at), "v": probe.vector.astype(np.float32).tobytes()}
            try:
                await self.redis.client.xadd(self.log_key, fields,  # type: ignore[arg-type]
                                             maxlen=sum(c.max_entries for c in self.cfgs.values()),
                                             approximate=True)
            except (RedisError, OSError, TimeoutError) as exc:
                raise StoreDown(f"append failed: {exc}") from exc

    def _insert(self, model: str, namespace: str, sig: str, stored: Stored) -> None:
        index = self.indexes[model]
        index.add(namespace, sig, stored)
        self.metrics.cache_semantic_entries.labels(model).set(len(index))

    async def sync(self) -> int:
        """Read the entries other replicas appended since the last call; how many were new."""
        assert self.redis is not None
        added = 0
        while True:
            batch: Any = await self.redis.client.xread({self.log_key: self.last_id}, count=1000)
            if not batch:
                return added
            rows = batch[0][1]
            for entry_id, fields in rows:
                self.last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                added += self._read(fields)
            if len(rows) < 1000:
                return added

    def _read(self, fields: dict) -> int:
        try:
            model = fields[b"m"].decode()
            expires_at = float(fields[b"e"])
            vector = np.frombuffer(fields[b"v"], dtype=np.float32)
            stored = Stored(fields[b"k"].decode(), fields[b"t"].decode(), vector, expires_at)
            namespace, sig = fields[b"n"].decode(), fields[b"s"].decode()
        except (KeyError, ValueError, UnicodeDecodeError):
            return 0  # written by another version
        if model not in self.indexes or vector.shape != (DIM,) or expires_at <= self.clock.time():
            return 0
        if stored.key in self.indexes[model].order:
            return 0  # this replica's own entry, read back
        self._insert(model, namespace, sig, stored)
        return 1

    async def _sync_loop(self) -> None:
        interval = min(c.sync_interval_s for c in self.cfgs.values())
        failing = False
        while True:
            await self.clock.sleep(interval)
            try:
                await self.sync()
                failing = False
            except (RedisError, OSError, TimeoutError) as exc:
                if not failing:  # once per outage, not once per interval
                    log.warning("semantic cache: reading the Redis entry log failed (%s: %s); retrying every %.1fs",
                                type(exc).__name__, exc, interval)
                failing = True
                self.metrics.cache_errors.labels("sync").inc()
