"""Alerts: budget threshold crossings, spend spikes and loops, to the log, Prometheus and
webhooks routed by alert kind.

A threshold (70/100/120% by default) fires once per budget instance and window (for a
rolling budget: once per epoch-aligned window of its length): the first
replica to cross it sets a flag in the store that lasts until the window ends, and each
replica remembers what it already fired so that it does not ask again. A spike fires
when the spend of a tenant, agent or feature (``spike_by``) in the current hour exceeds
``spike_factor`` times its average hourly spend over the previous ``spike_baseline_hours``
(hours before its first spend do not count), once per series and hour.

Each webhook receiver (``alerts.webhooks``, plus ``webhook_url``, which takes every alert)
has its own bounded queue and sender task, so a slow receiver neither delays a request nor
another receiver. A receiver takes the alert kinds in its ``kinds`` list (``threshold`` means every
threshold). Its payload is the alert as JSON (``generic``), a ``template`` whose strings
are filled from the alert's fields (``"{budget} is at {ratio}"``; a string that is exactly
one ``{field}`` keeps the field's type), or a Slack message ``{"text": ...}`` (``slack``).
A post is retried with exponential backoff (0.5 s, 1 s, 2 s, ... at most 30 s) up to
``webhook_retries`` times; an alert a receiver never took (retries spent, or its queue
full) is counted in ``kvroute_alert_dead_letters_total{receiver}`` (the receiver's index).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from typing import Any

import aiohttp

from kvroute.router.governance.clock import Clock
from kvroute.router.governance.config import AlertConfig, Webhook
from kvroute.router.governance.identity import Attribution
from kvroute.router.governance.store import Slot, Store, Used, ratio
from kvroute.router.metrics import RouterMetrics

log = logging.getLogger(__name__)
SPIKE_CHECK_S = 60.0
_FIELD = re.compile(r"\{(\w+)\}")


def threshold_kind(t: float) -> str:
    return f"threshold_{round(t * 100)}"


def spike_series(attrs: Attribution, dim: str) -> str | None:
    """The hourly spend series of ``attrs`` for one spike dimension (the tenant's is its name)."""
    if dim == "tenant":
        return attrs.tenant
    value = attrs.tag(dim)
    return f"{dim}\x1f{attrs.tenant}/{value}" if value else None


def _fill(template: Any, alert: dict) -> Any:
    if isinstance(template, str):
        whole = _FIELD.fullmatch(template)
        if whole and whole.group(1) in alert:
            return alert[whole.group(1)]
        return _FIELD.sub(lambda m: str(alert.get(m.group(1), m.group(0))), template)
    if isinstance(template, dict):
        return {k: _fill(v, alert) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, alert) for v in template]
    return template


def payload(hook: Webhook, alert: dict) -> Any:
    """What ``hook`` receives for ``alert``."""
    if hook.format == "slack":
        if isinstance(hook.template, str):
            return {"text": _fill(hook.template, alert)}
        details = ", ".join(f"{k}={v}" for k, v in alert.items() if k not in ("kind", "at") and v is not None)
        return {"text": f":rotating_light: kvroute alert *{alert['kind']}*: {details}"}
    return alert if hook.template is None else _fill(hook.template, alert)


class Alerter:
    def __init__(self, cfg: AlertConfig, store: Store, clock: Clock, metrics: RouterMetrics):
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.receivers = cfg.receivers
        self.queues: list[asyncio.Queue[dict]] = [asyncio.Queue(cfg.webhook_queue) for _ in self.receivers]
        self.fired: list[dict] = []  # the last alerts, newest last (bounded), for the admin view and tests
        self._seen: dict[str, float] = {}  # flag -> expiry: fired from this replica or found set
        self._spike_checked: dict[str, float] = {}

    def emit(self, kind: str, **fields) -> None:
        alert = {"kind": kind, "at": self.clock.time(), **fields}
        log.warning("ALERT %s %s", kind, " ".join(f"{k}={v}" for k, v in fields.items()))
        self.metrics.alerts.labels(kind).inc()
        self.fired.append(alert)
        del self.fired[:-200]
        for i, (hook, queue) in enumerate(zip(self.receivers, self.queues)):
            if not hook.wants(kind):
                continue
            try:
                queue.put_nowait(alert)
            except asyncio.QueueFull:
                self.metrics.webhooks.labels("dropped").inc()
                self.metrics.webhook_dead_letters.labels(str(i)).inc()

    async def once(self, flag: str, ttl_s: float) -> bool:
        """True for the first caller (on any replica) until ``ttl_s`` passes."""
        now = self.clock.time()
        if self._seen.get(flag, 0.0) > now:
            return False
        self._seen[flag] = now + ttl_s
        if len(self._seen) > 10_000:
            self._seen = {k: v for k, v in self._seen.items() if v > now}
        return await self.store.set_flag(flag, ttl_s, now)

    async def budget_used(self, slot: Slot, scope: str, used: Used, label: str = "other") -> float:
        """``label``: the instance's ``key`` label on the gauge, already bounded by the caller."""
        r = ratio(slot, used.tokens, used.usd, used.tool_calls)
        self.metrics.budget_used_ratio.labels(slot.budget, label).set(r)
        now = self.clock.time()
        key, ttl = f"alert:{slot.key}", slot.expire_at - now
        if slot.rolling:  # once per window: the window's index dedups, as with fixed windows
            window_s = slot.bucket_s * slot.buckets
            index = math.floor(now / window_s)
            key, ttl = f"{key}:{index}", (index + 1) * window_s - now
        for t in self.cfg.thresholds:
            if r >= t and await self.once(f"{key}:{t}", max(1.0, ttl)):
                self.emit(threshold_kind(t), budget=slot.budget, scope=scope, key=slot.key, ratio=round(r, 4),
                          tokens=used.tokens, usd=round(used.usd, 6), tool_calls=used.tool_calls)
        return r

    def spike_series(self, attrs: Attribution) -> tuple[str, ...]:
        return tuple(s for s in (spike_series(attrs, d) for d in self.cfg.spike_by) if s is not None)

    async def check_spike(self, attrs: Attribution) -> None:
        for dim in self.cfg.spike_by:
            series = spike_series(attrs, dim)
            if series is not None:
                await self._check_series(dim, series, attrs)

    async def _check_series(self, dim: str, series: str, attrs: Attribution) -> None:
        now = self.clock.time()
        if now - self._spike_checked.get(series, -1e18) < SPIKE_CHECK_S:
            return
        self._spike_checked[series] = now
        hourly = await self.store.hourly(series)
        hour = int(now // 3600)
        past = [h for h in hourly if hour - self.cfg.spike_baseline_hours <= h < hour]
        if not past:
            return
        hours = hour - min(past)
        baseline = sum(hourly[h] for h in past) / hours
        current = hourly.get(hour, 0.0)
        if baseline > 0 and current > self.cfg.spike_factor * baseline and await self.once(f"spike:{series}:{hour}",
                                                                                          3600.0):
            fields: dict[str, Any] = {"tenant": attrs.tenant}
            if dim != "tenant":
                fields[dim] = attrs.tag(dim)
            self.emit("spend_spike", by=dim, **fields, current_hour_usd=round(current, 6),
                      hourly_average_usd=round(baseline, 6), factor=round(current / baseline, 2))

    async def run_webhooks(self, session: aiohttp.ClientSession) -> None:
        """Drain every receiver's queue forever (a background task of the app)."""
        tasks = [asyncio.create_task(self._send_loop(i, session)) for i in range(len(self.receivers))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _send_loop(self, i: int, session: aiohttp.ClientSession) -> None:
        hook, queue = self.receivers[i], self.queues[i]
        timeout = aiohttp.ClientTimeout(total=self.cfg.webhook_timeout_s)
        while True:
            alert = await queue.get()
            body = payload(hook, alert)
            for attempt in range(self.cfg.webhook_retries + 1):
                try:
                    async with session.post(hook.url, json=body, timeout=timeout) as resp:
                        if resp.status < 300:
                            self.metrics.webhooks.labels("sent").inc()
                            break
                        problem = f"HTTP {resp.status}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    problem = type(exc).__name__
                if attempt == self.cfg.webhook_retries:
                    self.metrics.webhooks.labels("failed").inc()
                    self.metrics.webhook_dead_letters.labels(str(i)).inc()
                    log.error("alert webhook %d failed after %d tries: %s", i, attempt + 1, problem)
                else:
                    await self.clock.sleep(min(30.0, 0.5 * 2 ** attempt))


async def cancel(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
