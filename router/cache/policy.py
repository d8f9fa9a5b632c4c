"""Which requests the cache may answer or fill, and the key an answer is stored under.

Key: SHA-256 over the tenant (or, without governance, a digest of the API key), the model,
a forced tier, and the canonical body: keys sorted at every depth, with ``stream``,
``stream_options`` and ``user`` dropped (they change the delivery or the attribution, not
the answer). Everything else stays, so any sampling field that differs is another entry.

Cacheable by default: ``n`` of 1 and a deterministic sampler (``temperature`` 0, a ``seed``,
or no ``temperature`` on a model marked ``greedy_by_default``), and every embeddings,
classification and pooling request: a pooling model gives the same output again. The client overrides with
``x-kvroute-cache: use | refresh | bypass`` and HTTP's ``Cache-Control``: ``no-store``
bypasses, ``no-cache`` refreshes (answers from a worker, then stores that answer).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping

import orjson

from kvroute.router.cache.config import ExactCacheConfig, SemanticCacheConfig
from kvroute.router.errors import InvalidRequest
from kvroute.router.requests import (
    CHAT_BATCH,
    CLASSIFY,
    COHERE_CHAT,
    COHERE_EMBED,
    EMBEDDING,
    GENERATE,
    GENERATIVE_SCORING,
    MESSAGES,
    NO_PREFILL,
    POOL,
    RERANK,
    RESPONSES,
    SCORE,
    ParsedRequest,
)

HEADER = "x-kvroute-cache"
_DROPPED = ("stream", "stream_options", "user")
# A pooling model gives the same output again; so does generative scoring (label
# probabilities after a prefill, no sampling).
_SAME_AGAIN = (EMBEDDING, CLASSIFY, POOL, GENERATIVE_SCORING)


class Mode(enum.Enum):
    USE = "use"  # look up; store a miss
    REFRESH = "refresh"  # skip the lookup; store the fresh answer
    BYPASS = "bypass"  # neither


def decide(req: ParsedRequest, cache_control: str | None, cfg: ExactCacheConfig | SemanticCacheConfig) -> Mode:
    asked = req.headers.get(HEADER)
    if req.kind in (RESPONSES, MESSAGES, SCORE, RERANK, GENERATE, CHAT_BATCH, COHERE_EMBED, COHERE_CHAT) \
            or req.kind in NO_PREFILL:
        return Mode.BYPASS  # answers the cache cannot replay (streams of these APIs, scores); a count is cheap
    if asked is not None and asked.strip().lower() not in ("use", "refresh", "bypass"):
        raise InvalidRequest(f"Header '{HEADER}' must be use, refresh or bypass", param=HEADER)
    asked = asked.strip().lower() if asked else None
    directives = {d.strip().split("=")[0].lower() for d in (cache_control or "").split(",")}
    if asked == "bypass" or "no-store" in directives:
        return Mode.BYPASS
    if asked is None and req.kind not in _SAME_AGAIN and not deterministic(req.body, cfg.greedy_by_default):
        return Mode.BYPASS
    if asked == "refresh" or "no-cache" in directives:
        return Mode.REFRESH
    return Mode.USE


def deterministic(body: Mapping, greedy_by_default: bool) -> bool:
    """One answer, from a sampler that gives the same answer again."""
    if body.get("n") not in (None, 1):
        return False
    temperature = body.get("temperature")
    if temperature == 0:
        return True
    seed = body.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        return True
    return temperature is None and greedy_by_default


def canonical(body: Mapping) -> bytes:
    return orjson.dumps({k: v for k, v in body.items() if k not in _DROPPED}, option=orjson.OPT_SORT_KEYS)


def cache_key(namespace: str, model: str, tier: str | None, body: Mapping) -> str:
    h = hashlib.sha256()
    for part in (namespace.encode(), model.encode(), (tier or "").encode()):
        h.update(len(part).to_bytes(4, "big") + part)  # length-prefixed: no two splits collide
    h.update(canonical(body))
    return h.hexdigest()


def api_key_namespace(authorization: str | None) -> str:
    """Without governance: one namespace per API key (a digest; the key is never stored)."""
    return "key:" + hashlib.sha256((authorization or "").encode()).hexdigest()
