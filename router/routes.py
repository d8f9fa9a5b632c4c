"""What the router knows about each model it serves: the types the request path works on.

A ``ModelRoute`` is one worker pool (a plain model, or one tier of a tiered model) with
its policy, prefix index and prefixer. A ``ServedModel`` is a model as clients name it:
one route, or tiers cheapest first with the classifier that picks one and, for
``mode: cascade``, the judge of cheap answers. ``ModelRoutes`` holds them all.

This module imports nothing from governance, the proxy or the pipeline; they import it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass

from kvroute.router.chat_template import TemplateConfig, load_template
from kvroute.router.confidence import AnswerJudge
from kvroute.router.config import ModelConfig, RouterConfig
from kvroute.router.errors import ModelNotFound
from kvroute.router.index import PrefixIndex
from kvroute.router.kv_index import ExactIndex
from kvroute.router.metrics import RouterMetrics
from kvroute.router.policies.base import Policy, PolicyDeps, RequestContext
from kvroute.router.policies.registry import create_policy
from kvroute.router.prefix import Prefixer, PromptTokenizer, rest_of_batch_tokens, root_key
from kvroute.router.requests import NO_PREFILL, ParsedRequest
from kvroute.router.retry import Clock, MonotonicClock, Retrier
from kvroute.router.tiers import TierChooser
from kvroute.router.tls import client_context
from kvroute.router.upstream.workers import Worker, WorkerPool

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 16  # used only until a worker reports its own
# Completion tokens a request without max_tokens is expected to generate, for load
# estimates only (governance reserves its own default_max_tokens).
EXPECTED_MAX_TOKENS = 256
MAX_TOKENS_CLAMP = 4096


def expected_max_tokens(requested: int | None) -> int:
    """Completion tokens to expect of a request that asked for ``requested`` (None: unsaid)."""
    return max(1, min(EXPECTED_MAX_TOKENS if requested is None else requested, MAX_TOKENS_CLAMP))


@dataclass
class ModelRoute:
    cfg: ModelConfig
    pool: WorkerPool
    policy: Policy
    index: PrefixIndex | ExactIndex
    prefixer: Prefixer
    retry: Retrier  # the pool's retry rules, backoff and budget

    @property
    def index_kind(self) -> str:
        """kv_events (exact, from vLLM's events), speculative, or approximate (no tokenizer)."""
        if not self.prefixer.exact:
            return "approximate"
        return "kv_events" if self.cfg.kv_events else "speculative"

    @property
    def block_size(self) -> int:
        if self.cfg.block_size:
            return self.cfg.block_size
        for w in self.pool.all():
            if w.block_size:
                return w.block_size
        return DEFAULT_BLOCK_SIZE

    async def context(self, req: ParsedRequest) -> RequestContext:
        """What a policy sees of ``req`` on this route: its block keys, sizes and session."""
        view = req.prompt_view  # an embeddings input reads as a prompt, a Responses input as messages
        if req.kind in NO_PREFILL or req.continues_stored:
            # A token count prefills nothing; a stored conversation's prompt is on its worker, not
            # in the request. No keys to route by, or to record as cached.
            pk = self.prefixer.estimate(view)
        else:
            # A LoRA adapter's and a cache salt's blocks are vLLM's apart: their keys start apart too.
            root = root_key(self.cfg.served_name if self.cfg.lora else None, req.body.get("cache_salt"))
            pk = await self.prefixer.keys(view, self.block_size, root)
        session = req.headers.get("x-kvroute-session") or req.body.get("user")
        return RequestContext(
            model=self.cfg.name,
            block_keys=pk.block_keys,
            block_size=pk.block_size,
            prompt_tokens=pk.prompt_tokens + rest_of_batch_tokens(view),
            max_tokens=expected_max_tokens(req.max_tokens) * req.sequences,
            session_key=session if isinstance(session, str) else None,
            headers=req.headers,
        )


@dataclass(frozen=True)
class Executors:
    """The thread pools that keep blocking work off the event loop, one per kind, so a slow
    classifier batch or a model reload never queues tokenization, or the other way round.
    None: asyncio's default executor."""

    tokenizer: Executor | None = None  # long prompts' templating and tokenization (router/prefix.py)
    classifier: Executor | None = None  # tier classifier batches and reloads (router/tiers.py)
    judge: Executor | None = None  # the cascade's answer scorer and its load (router/confidence.py)


@dataclass
class ServedModel:
    """A model as clients name it: one pool, or tiers (cheapest first) and a chooser."""

    name: str
    tiers: list[ModelRoute]
    chooser: TierChooser | None = None
    judge: AnswerJudge | None = None  # mode: cascade (router/cascade.py)

    def tier(self, name: str) -> ModelRoute | None:
        return next((t for t in self.tiers if t.cfg.tier == name), None)

    def healthy(self) -> bool:
        return any(t.pool.healthy() for t in self.tiers)


class ModelRoutes:
    """All configured models by the name clients send, and their pools by key.

    ``clock`` times breaker cooldowns, retry budgets and backoff (default: monotonic real
    time); ``rng`` draws the backoff jitter. Tests inject both."""

    def __init__(self, cfg: RouterConfig, executors: Executors = Executors(), metrics: RouterMetrics | None = None,
                 *, clock: Clock | None = None, rng: random.Random | None = None):
        self.by_name: dict[str, ServedModel] = {}
        self.by_key: dict[str, ModelRoute] = {}
        metrics = metrics or RouterMetrics()
        self._cfg = cfg
        self._metrics = metrics
        self._clock = clock or MonotonicClock()
        self._rng = rng or random.Random()
        # One copy of each tokenizer folder: a base model and its LoRA adapters (or one
        # server under several names) share it, its memory and its cache of prompt pieces.
        self._tokenizers: dict[str, PromptTokenizer] = {}
        for m in cfg.models:
            pools = [self._pool(p, executors.tokenizer) for p in m.pools]
            chooser = None
            if m.classifier is not None:
                chooser = TierChooser(m.name, m.classifier, len(pools), executors.classifier, metrics)
            judge = AnswerJudge(m.name, m.cascade, executors.judge) if m.cascade is not None else None
            self.by_name[m.name] = ServedModel(m.name, pools, chooser, judge)

    def _pool(self, m: ModelConfig, executor: Executor | None) -> ModelRoute:
        index: PrefixIndex | ExactIndex
        if m.kv_events is not None:
            index = ExactIndex(m.kv_capacity_blocks, m.kv_events.speculative_ttl_s)
        else:
            index = PrefixIndex(m.kv_capacity_blocks)
        if m.tokenizer and m.tokenizer not in self._tokenizers:
            self._tokenizers[m.tokenizer] = PromptTokenizer(m.tokenizer)
        tokenizer = self._tokenizers[m.tokenizer] if m.tokenizer else None
        if tokenizer is None:
            log.warning("model %s: no tokenizer configured, routing in APPROXIMATE mode "
                        "(character chunks, not KV blocks)", m.key)
        pool = WorkerPool(m.key, m.workers, tier=m.tier, api_key=m.api_key, breaker=self._cfg.breaker,
                          now=self._clock.time, ssl=client_context(m.tls))
        policy = create_policy(m.policy, PolicyDeps(index=index), m.policy_options)
        pool.on_change(policy.on_workers_changed)
        metrics = self._metrics

        def joined(w: Worker) -> None:  # its healthy and breaker series exist from the start
            metrics.join_worker(w.model, w.url, healthy=w.healthy, breaker=int(w.breaker.state))

        for w in pool.all():
            joined(w)
        pool.on_join(joined)
        pool.on_leave(self._forget)
        pool.on_breaker_change(lambda w: metrics.breaker_state.labels(w.model, w.url).set(int(w.breaker.state)))
        template = TemplateConfig(load_template(m.chat_template) if m.chat_template else None,
                                  m.chat_template_kwargs, m.chat_template_content_format,
                                  m.trust_request_chat_template)
        prefixer = Prefixer(tokenizer, m.approx_chunk_chars, executor, model=m.key, metrics=metrics,
                            now=self._clock.time, template=template)
        route = ModelRoute(m, pool, policy, index, prefixer,
                           Retrier(self._cfg.retries, self._clock, self._rng))
        self.by_key[m.key] = route
        return route

    def get(self, name: str) -> ServedModel:
        served = self.by_name.get(name)
        if served is None:
            raise ModelNotFound(f"The model '{name}' does not exist or is not served by this "
                                f"router. Available: {', '.join(self.by_name)}", param="model")
        return served

    def all_workers(self) -> Iterable[Worker]:
        for route in self.by_key.values():
            yield from route.pool.all()

    def route_of(self, worker: Worker) -> ModelRoute:
        return self.by_key[worker.model]

    def choosers(self) -> list[TierChooser]:
        return [s.chooser for s in self.by_name.values() if s.chooser is not None]

    def judges(self) -> list[AnswerJudge]:
        return [s.judge for s in self.by_name.values() if s.judge is not None]

    def _forget(self, worker: Worker) -> None:
        """Remove the metric series of a worker that left its pool and has nothing in flight."""
        route = self.by_key[worker.model]
        holders = [r for r in self.by_key.values() if r.pool.get(worker.url) is not None]
        if route in holders:
            return  # it rejoined before its last request ended: the series are the new member's
        models = {worker.model}  # health and breaker series: the pool key (model/tier)
        if not any(r.cfg.name == route.cfg.name for r in holders):
            models.add(route.cfg.name)  # request series: the model's name
        self._metrics.forget_worker(models, worker.url, everywhere=not holders)

    def apply_discovery(self, found: Iterable) -> None:
        """Replace every pool's members with what discovery sees (url, model, tier); the
        pods of a pool with ``tls`` are called over HTTPS."""
        members: dict[str, list[tuple[str, str | None]]] = {key: [] for key in self.by_key}
        for w in found:
            key = f"{w.model}/{w.tier}" if w.tier else w.model
            if key not in members:  # a plain model's pool also takes pods with a tier label
                key = w.model if w.model in members else None
            if key is None:
                log.debug("discovered worker %s serves unconfigured model %s", w.url, w.model)
                continue
            url = w.url
            if self.by_key[key].cfg.tls is not None:  # a pool with tls calls its pods over HTTPS
                url = "https://" + url.removeprefix("http://")
            members[key].append((url, w.tier))
        for key, route in self.by_key.items():
            if route.cfg.workers_from is not None:  # an adapter on its base model's pods
                members[key] = list(members.get(route.cfg.workers_from, ()))
        for key, urls in members.items():
            self.by_key[key].pool.set_members(urls)
