"""The policy interface.

``select(workers, ctx)`` is synchronous, does no I/O and has the same signature for every
policy. The framework (``router.pipeline``) filters out unhealthy workers before calling
it, updates load, and retries on another worker when a dispatch fails. Hooks do nothing
by default.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from kvroute.router.index import PrefixIndex
from kvroute.router.kv_index import ExactIndex
from kvroute.router.upstream.workers import Worker


@dataclass(frozen=True)
class RequestContext:
    """Everything a policy may look at, computed once per request."""

    model: str
    block_keys: tuple[int, ...]  # chained hashes of the prompt's full KV blocks
    block_size: int  # tokens per block (characters per chunk in approximate mode)
    prompt_tokens: int  # exact with a tokenizer, estimated in approximate mode
    max_tokens: int  # expected decode tokens (clamped), for all the sequences it asks for
    session_key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyDeps:
    """Shared state handed to a policy at construction."""

    index: PrefixIndex | ExactIndex  # speculative, or exact from vLLM's KV events
    rng: random.Random = field(default_factory=random.Random)


class Policy:
    name: ClassVar[str]

    def __init__(self, deps: PolicyDeps, options: Mapping[str, Any] | None = None):
        self.deps = deps
        self.options = dict(options or {})

    @classmethod
    def validate_options(cls, options: Mapping[str, Any], key: str) -> None:
        """Raise ``ConfigError`` naming ``key`` for bad options. Default: none accepted."""
        from kvroute.router.errors import ConfigError

        for k in options:
            raise ConfigError(f"{key}.{k}", f"policy {cls.name!r} takes no option {k!r}")

    def select(self, workers: Sequence[Worker], ctx: RequestContext) -> Worker | None:
        raise NotImplementedError

    def predicted_cached_tokens(self, worker: Worker, ctx: RequestContext) -> int:
        """Tokens of the prompt the policy believes ``worker`` has cached."""
        matched = self.deps.index.match(ctx.block_keys, [worker.url])[worker.url]
        return min(matched * ctx.block_size, ctx.prompt_tokens)

    def on_dispatch(self, worker: Worker, ctx: RequestContext) -> None:
        """The request was sent to ``worker``: by default, record its blocks there."""
        self.deps.index.insert(worker.url, ctx.block_keys)

    def on_complete(self, worker: Worker, ctx: RequestContext, ok: bool) -> None:
        """The request is done: the index may now start to expire its unconfirmed blocks."""
        self.deps.index.settle(worker.url, ctx.block_keys)

    def on_workers_changed(self, workers: Sequence[Worker]) -> None:
        self.deps.index.retain_workers(w.url for w in workers)


T = TypeVar("T")


class PerCandidates(Generic[T]):
    """A value derived from the candidate workers, built once per candidate set.

    The router hands policies the same tuple of healthy workers until health or
    membership changes, so whatever a policy derives from the whole list (a map by URL,
    a sorted order) costs once per change instead of once per request. A list, which may
    change in place, is never kept.
    """

    def __init__(self, build: Callable[[Sequence[Worker]], T]):
        self._build = build
        self._workers: tuple[Worker, ...] | None = None
        self._value: T | None = None

    def of(self, workers: Sequence[Worker]) -> T:
        if workers is self._workers:
            return self._value  # type: ignore[return-value]
        value = self._build(workers)
        if isinstance(workers, tuple):
            self._workers, self._value = workers, value
        return value


def pick_random_min(workers: Sequence[Worker], scores: Sequence[float], rng: random.Random) -> Worker:
    """The worker with the lowest score; ties broken at random."""
    best = min(scores)
    tied = [w for w, s in zip(workers, scores) if s == best]
    return tied[0] if len(tied) == 1 else rng.choice(tied)
