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
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from concurrent.futures import Executor
from typing import Any

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

    @property
    def thresholds(self) -> tuple[float, ...]:
        if self.cfg.thresholds is not None:
            return self.cfg.thresholds
        return (float(self.scorer.threshold),)

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.scorer = await loop.run_in_executor(self.executor, _load, self.cfg.path)
        except Exception as exc:
            raise ConfigError(f"models[{self.model}].classifier.path",
                              f"cannot load the tier classifier: {exc}") from exc
        self.version = self.scorer.version
        log.info("model %s: tier classifier %s loaded (thresholds %s)", self.model, self.version,
                 self.thresholds)

    async def reload_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.cfg.reload_s)
            try:
                version = await loop.run_in_executor(self.executor, _version, self.cfg.path)
                if version != self.version:
                    scorer = await loop.run_in_executor(self.executor, _load, self.cfg.path)
                    self.scorer, self.version = scorer, scorer.version
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
        score = await fut
        return self.tier_for(score), score

    def _flush(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        batch, self._queue = self._queue, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._score(batch))
            self._scoring.add(task)
            task.add_done_callback(self._scored)

    def _scored(self, task: asyncio.Task) -> None:
        self._scoring.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("model %s: scoring a classifier batch failed", self.model, exc_info=task.exception())

    async def _score(self, batch: list[tuple[str, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            scores = await loop.run_in_executor(self.executor, self.scorer.score, [t for t, _ in batch])
        except Exception as exc:  # the scorer failed: each caller gets its error
            _fail(batch, exc)
            return
        try:
            self.metrics.classifier_seconds.labels(self.model).observe(time.perf_counter() - start)
            for (_, fut), score in zip(batch, scores):
                if not fut.done():
                    fut.set_result(float(score))
        finally:  # a bug above (raised on, and logged by _scored) must not leave a caller waiting
            _fail(batch, RuntimeError(f"model {self.model}: the classifier batch ended without a score"))

    async def close(self) -> None:
        """Score what is queued and wait for the batches in flight (before the executor goes)."""
        if self._flusher is not None:
            self._flusher.cancel()
        with contextlib.suppress(Exception):
            self._flush()
        await asyncio.gather(*self._scoring, return_exceptions=True)


def _fail(batch: list[tuple[str, asyncio.Future]], exc: BaseException) -> None:
    """Fail the callers of ``batch`` still waiting (none once every score is set)."""
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(exc)
