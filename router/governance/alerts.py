"""Alerts: budget threshold crossings, spend spikes and loops, to the log, Prometheus and
an optional webhook.

A threshold (70/100/120% by default) fires once per budget instance and window (for a
rolling budget: once per epoch-aligned window of its length): the first
replica to cross it sets a flag in the store that lasts until the window ends, and each
replica remembers what it already fired so that it does not ask again. A spike fires
when a tenant's spend in the current hour exceeds ``spike_factor`` times its average
hourly spend over the previous ``spike_baseline_hours`` (hours before its first spend do
not count), once per tenant and hour. Webhook posts go through a bounded queue drained by
a background task with a timeout and retries, so an alert never delays a request; when
the queue is full the alert is dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

import aiohttp

from kvroute.router.governance.clock import Clock
from kvroute.router.governance.config import AlertConfig
from kvroute.router.governance.store import Slot, Store, Used, ratio
from kvroute.router.metrics import RouterMetrics

log = logging.getLogger(__name__)
SPIKE_CHECK_S = 60.0


def threshold_kind(t: float) -> str:
    return f"threshold_{round(t * 100)}"


class Alerter:
    def __init__(self, cfg: AlertConfig, store: Store, clock: Clock, metrics: RouterMetrics):
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.queue: asyncio.Queue[dict] = asyncio.Queue(cfg.webhook_queue)
        self.fired: list[dict] = []  # the last alerts, newest last (bounded), for the admin view and tests
        self._seen: dict[str, float] = {}  # flag -> expiry: fired from this replica or found set
        self._spike_checked: dict[str, float] = {}

    def emit(self, kind: str, **fields) -> None:
        alert = {"kind": kind, "at": self.clock.time(), **fields}
        log.warning("ALERT %s %s", kind, " ".join(f"{k}={v}" for k, v in fields.items()))
        self.metrics.alerts.labels(kind).inc()
        self.fired.append(alert)
        del self.fired[:-200]
        if self.cfg.webhook_url:
            try:
                self.queue.put_nowait(alert)
            except asyncio.QueueFull:
                self.metrics.webhooks.labels("dropped").inc()

    async def once(self, flag: str, ttl_s: float) -> bool:
        """True for the first caller (on any replica) until ``ttl_s`` passes."""
        now = self.clock.time()
        if self._seen.get(flag, 0.0) > now:
            return False
        self._seen[flag] = now + ttl_s
        if len(self._seen) > 10_000:
            self._seen = {k: v for k, v in self._seen.items() if v > now}
        return await self.store.set_flag(flag, ttl_s, now)

    async def budget_used(self, slot: Slot, scope: str, used: Used) -> float:
        r = ratio(slot, used.tokens, used.usd, used.tool_calls)
        self.metrics.budget_used_ratio.labels(slot.budget).set(r)
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

    async def check_spike(self, tenant: str) -> None:
        now = self.clock.time()
        if now - self._spike_checked.get(tenant, -1e18) < SPIKE_CHECK_S:
            return
        self._spike_checked[tenant] = now
        hourly = await self.store.hourly(tenant)
        hour = int(now // 3600)
        past = [h for h in hourly if hour - self.cfg.spike_baseline_hours <= h < hour]
        if not past:
            return
        hours = hour - min(past)
        baseline = sum(hourly[h] for h in past) / hours
        current = hourly.get(hour, 0.0)
        if baseline > 0 and current > self.cfg.spike_factor * baseline and await self.once(f"spike:{tenant}:{hour}",
                                                                                          3600.0):
            self.emit("spend_spike", tenant=tenant, current_hour_usd=round(current, 6),
                      hourly_average_usd=round(baseline, 6), factor=round(current / baseline, 2))

    async def run_webhook(self, session: aiohttp.ClientSession) -> None:
        """Drain the queue forever (a background task of the app)."""
        url = self.cfg.webhook_url
        if url is None:
            return
        timeout = aiohttp.ClientTimeout(total=self.cfg.webhook_timeout_s)
        while True:
            alert = await self.queue.get()
            for attempt in range(self.cfg.webhook_retries + 1):
                try:
                    async with session.post(url, json=alert, timeout=timeout) as resp:
                        if resp.status < 300:
                            self.metrics.webhooks.labels("sent").inc()
                            break
                        problem = f"HTTP {resp.status}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    problem = type(exc).__name__
                if attempt == self.cfg.webhook_retries:
                    self.metrics.webhooks.labels("failed").inc()
                    log.error("alert webhook failed after %d tries: %s", attempt + 1, problem)
                else:
                    await self.clock.sleep(min(30.0, 0.5 * 2 ** attempt))


async def cancel(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
