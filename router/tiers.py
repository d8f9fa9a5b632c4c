"""Choose the cheapest tier that will do, with the tier classifier (``classifier/``).

The classifier scores P(strong tier needed | prompt). With tiers ordered cheapest first
and ascending thresholds (the artifact's calibrated threshold for two tiers), the chosen
tier is the number of thresholds the score reaches. A request may force a tier with the
``x-kvroute-tier`` header.

Scoring never runs on the event loop: concurrent requests are gathered for up to
``batch_window_ms`` (or ``max_batch`` prompts) and scored as one batch in an executor,
which is several times cheaper per prompt than one at a time. The artifact is re-resolved
every ``reload_s``; when ``classifier refresh`` has swapped in a new version it is loaded
in the background and replaces the old scorer without a restart.

With ``classifier.target_strong_share`` the threshold follows live scores
(``router/calibration.py``), one threshold for every replica with ``online.shared``. With
``classifier.shadow`` a candidate artifact scores every batch after the callers have their
tiers; its would-be tiers only feed metrics.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from concurrent.futures import Executor
from typing import Any

from kvroute.router.calibration import DecayedMean, OnlineThreshold, SharedThreshold
from kvroute.router.config import ClassifierConfig
from kvroute.router.errors import ConfigError
from kvroute.router.metrics import RouterMetrics
from kvroute.router.prefix import normalize_content

log = logging.getLogger(__name__)


def prompt_text(body: dict) -> str:
    """What the classifier reads: the last user message, or the completion prompt."""
    messages = body.get("messages")
    if messages is not None:
        for m in reversed(messages):
            if m.get("role") == "user":
                return normalize_content(m.get("content"))
        return normalize_content(messages[-1].get("content")) if messages else ""
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt and isinstance(prompt[0], str) else ""
    return prompt if isinstance(prompt, str) else ""


def _load(path: str | None) -> Any:
    from kvroute.classifier.model import load_scorer  # torch and the encoder load only here

    return load_scorer(path)


def _version(path: str | None) -> str:
    from kvroute.classifier.model import DEFAULT_ARTIFACT, resolve_artifact

    return resolve_artifact(path or DEFAULT_ARTIFACT)[1]


class TierChooser:
    def __init__(self, model: str, cfg: ClassifierConfig, n_tiers: int, executor: Executor | None,
                 metrics: RouterMetrics):
        self.model = model
        self.cfg = cfg
        self.n_tiers = n_tiers
        self.executor = executor
        self.metrics = metrics
        self.scorer: Any = None
        self.version: str | None = None
        self._queue: list[tuple[str, asyncio.Future]] = []
        self._flusher: asyncio.TimerHandle | None = None
        # Batches being scored. The loop keeps only weak references to tasks: one nobody
        # holds can be collected mid-batch, and its callers' futures would never resolve.
        self._scoring: set[asyncio.Task] = set()
        self.online: OnlineThreshold | None = None  # classifier.target_strong_share
        self.shadow: Any = None  # classifier.shadow: a candidate scorer that never routes
        self.shadow_online: OnlineThreshold | None = None
        self.agreement = DecayedMean(cfg.online.window if cfg.online else 2000)
        online = cfg.online
        self.shared = SharedThreshold(online.redis, model) if online and online.redis else None

    @property
    def thresholds(self) -> tuple[float, ...]:
        if self.cfg.thresholds is not None:
            return self.cfg.thresholds
        if self.online is not None:
            return (self.online.threshold,)
        return (float(self.scorer.threshold),)

    def _calibrate_from(self, scorer: Any) -> None:
        """(Re)start online calibration from a newly loaded artifact's threshold."""
        if self.cfg.online is not None:
            self.online = OnlineThreshold(self.cfg.online, float(scorer.threshold))
        if self.cfg.thresholds is None:
            self.metrics.classifier_threshold.labels(self.model).set(self.thresholds[0])

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.scorer = await loop.run_in_executor(self.executor, _load, self.cfg.path)
        except Exception as exc:
            raise ConfigError(f"models[{self.model}].classifier.path",
                              f"cannot load the tier classifier: {exc}") from exc
        self.version = self.scorer.version
        self._calibrate_from(self.scorer)
        if self.cfg.shadow is not None:
            try:
                self.shadow = await loop.run_in_executor(self.executor, _load, self.cfg.shadow)
            except Exception as exc:
                raise ConfigError(f"models[{self.model}].classifier.shadow",
                                  f"cannot load the shadow classifier: {exc}") from exc
            if self.cfg.online is not None:
                self.shadow_online = OnlineThreshold(self.cfg.online, float(self.shadow.threshold))
            log.info("model %s: shadow classifier %s loaded", self.model, self.shadow.version)
        log.info("model %s: tier classifier %s loaded (thresholds %s)", self.model, self.version,
                 self.thresholds)

    async def sync_once(self) -> bool:
        """``online.shared``: send this replica's moves, route at the fleet's threshold."""
        if self.shared is None or self.online is None or self.version is None:
            return False
        ok = await self.shared.sync(self.online, self.version)
        if ok:
            self.metrics.classifier_threshold.labels(self.model).set(self.online.threshold)
        return ok

    async def sync_loop(self) -> None:
        """Every ``online.sync_s``; the first at once, so a new replica starts at the fleet's."""
        if self.shared is None or self.cfg.online is None:
            return
        while True:
            try:
                await self.sync_once()
            except Exception:  # never let the loop die; Redis failures are handled inside
                log.exception("model %s: syncing the shared classifier threshold failed", self.model)
            await asyncio.sleep(self.cfg.online.sync_s)

    async def reload_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.cfg.reload_s)
            try:
                version = await loop.run_in_executor(self.executor, _version, self.cfg.path)
                if version != self.version:
                    scorer = await loop.run_in_executor(self.executor, _load, self.cfg.path)
                    self.scorer, self.version = scorer, scorer.version
                    self._calibrate_from(scorer)
                    log.info("model %s: tier classifier reloaded, now %s", self.model, self.version)
            except Exception:  # keep serving with the model we have
                log.exception("model %s: classifier reload failed", self.model)

    def tier_for(self, score: float) -> int:
        return min(bisect.bisect_right(self.thresholds, score), self.n_tiers - 1)

    async def choose(self, text: str) -> tuple[int, float]:
        """(tier index, score) for one prompt, batched with concurrent callers."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append((text, fut))
        if len(self._queue) >= self.cfg.max_batch:
            self._flush()
        elif self._flusher is None:
            self._flusher = asyncio.get_running_loop().call_later(self.cfg.batch_window_ms / 1000, self._flush)
        tier, score = await fut
        return tier, score

    def _flush(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        batch, self._queue = self._queue, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._score(batch))
            self._scoring.add(task)
            task.add_done_callback(self._scoring.discard)

    async def _score(self, batch: list[tuple[str, asyncio.Future]]) -> None:
        # Logged in the task, not in a done callback: close() then sees it logged once its
        # batches are done (a callback may run later, after close() returned).
        try:
            await self._score_batch(batch)
        except Exception:
            log.exception("model %s: scoring a classifier batch failed", self.model)

    async def _score_batch(self, batch: list[tuple[str, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            scores = await loop.run_in_executor(self.executor, self.scorer.score, [t for t, _ in batch])
        except Exception as exc:  # the scorer failed: each caller gets its error
            _fail(batch, exc)
            return
        try:
            self.metrics.classifier_seconds.labels(self.model).observe(time.perf_counter() - start)
            # each caller's tier at the threshold the batch is observed at (it moves after)
            tiers = [self.tier_for(float(s)) for s in scores]
            for (_, fut), tier, score in zip(batch, tiers, scores):
                if not fut.done():
                    fut.set_result((tier, float(score)))
            live = [t == self.n_tiers - 1 for t in tiers]
        finally:  # a bug above (raised on, and logged by _score) must not leave a caller waiting
            _fail(batch, RuntimeError(f"model {self.model}: the classifier batch ended without a score"))
        self._observe(scores, live)
        if self.shadow is not None:
            try:
                shadow = await loop.run_in_executor(self.executor, self.shadow.score, [t for t, _ in batch])
            except Exception:  # the shadow never affects routing, not even by failing
                log.exception("model %s: the shadow classifier failed on a batch", self.model)
                return
            self._observe_shadow(shadow, live)

    def _observe(self, scores: list[float], strong: list[bool]) -> None:
        """Feed the online threshold and the live metrics with a routed batch."""
        self.metrics.would_be_strong.labels(self.model, "live").inc(sum(strong))
        if self.online is not None:
            self.online.observe(scores)
            self.metrics.classifier_threshold.labels(self.model).set(self.online.threshold)
            self.metrics.classifier_strong_share.labels(self.model).set(self.online.strong_share)

    def _observe_shadow(self, scores: list[float], live: list[bool]) -> None:
        threshold = self.shadow_online.threshold if self.shadow_online else float(self.shadow.threshold)
        would = [s >= threshold for s in scores]
        if self.shadow_online is not None:
            self.shadow_online.observe(scores)
        self.agreement.add([a == b for a, b in zip(would, live)])
        self.metrics.would_be_strong.labels(self.model, "shadow").inc(sum(would))
        self.metrics.shadow_agreement.labels(self.model).set(self.agreement.value)

    async def close(self) -> None:
        """Score what is queued and wait for the batches in flight (before the executor goes)."""
        if self._flusher is not None:
            self._flusher.cancel()
        with contextlib.suppress(Exception):
            self._flush()
        await asyncio.gather(*self._scoring, return_exceptions=True)
        if self.shared is not None:
            await self.shared.close()


def _fail(batch: list[tuple[str, asyncio.Future]], exc: BaseException) -> None:
    """Fail the callers of ``batch`` still waiting (none once every score is set)."""
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(exc)
