"""Prometheus metrics owned by one ``RouterMetrics`` object per app (no global registry).

Labels come from a small fixed set: ``model``, ``worker`` and ``status``.

A worker's series live as long as it is a member of a pool: ``join_worker`` creates its
``healthy`` and breaker series when it joins (a worker healthy from the start would
otherwise have none), ``forget_worker`` removes every series that names it when it leaves,
so pods that discovery dropped neither keep reporting ``healthy`` nor accumulate series.

The series a proxied request updates are bound once per worker (``worker_series``):
prometheus-client's ``labels()`` costs more than the update it finds the series for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase

from kvroute import __version__

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)
_USD_BUCKETS = (1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.5, 1, 5)
_ADDED_BUCKETS = (1e-4, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 7.5e-3, 0.01, 0.025, 0.05,
                  0.1, 0.25, 1, 5)
_DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.05)

# ``kvroute serve --procs N`` (router/siblings.py): /metrics merges every process's page.
# Counters and histograms are summed; gauges are summed (in flight, queued, cache sizes)
# unless listed here: health and breaker state take the worst process's view, the
# classifier's online figures the mean of the processes' (each calibrates on its share).
GAUGES_ACROSS_PROCS = {
    "kvroute_worker_healthy": "min", "kvroute_worker_breaker_state": "max", "kvroute_draining": "max",
    "kvroute_classifier_threshold": "mean", "kvroute_classifier_strong_share": "mean",
    "kvroute_classifier_shadow_agreement": "mean", "kvroute_budget_used_ratio": "max",
    # One value for the router, not a total: its version, when its oldest process started.
    "kvroute_build_info": "max", "python_info": "max", "process_start_time_seconds": "min",
    "process_max_fds": "min",
}
PROCS_MERGED = "kvroute_procs_merged"  # gauge on a merged page: the processes it covers


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # What every Prometheus client exports by default, on this registry: the process's
        # CPU, memory, file descriptors and start time (process_*), Python's version and
        # garbage collections (python_*).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build_info = Gauge("kvroute_build_info", "1, labelled with the running kvroute's version",
                                ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        mw = ["model", "worker"]
        self.requests = Counter("kvroute_worker_requests", "Requests per worker and outcome",
                                mw + ["status"], registry=r)
        self.prompt_tokens = Counter("kvroute_worker_prompt_tokens", "Prompt tokens (usage)",
                                     mw, registry=r)
        self.completion_tokens = Counter("kvroute_worker_completion_tokens",
                                         "Completion tokens (usage)", mw, registry=r)
        self.cached_tokens = Counter("kvroute_worker_cached_prompt_tokens",
                                     "Prompt tokens served from the worker's prefix cache "
                                     "(usage.prompt_tokens_details.cached_tokens)", mw, registry=r)
        self.predicted_cached_tokens = Counter("kvroute_worker_predicted_cached_tokens",
                                               "Prompt tokens the router expected to be cached",
                                               mw, registry=r)
        self.in_flight = Gauge("kvroute_worker_in_flight_requests", "Requests in flight",
                               mw, registry=r)
        self.healthy = Gauge("kvroute_worker_healthy", "1 when the worker is routable",
                             mw, registry=r)
        self.ttft = Histogram("kvroute_ttft_seconds", "Time to first token (streams) or to "
                              "the response (non-streaming)", mw, buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.latency = Histogram("kvroute_request_seconds", "End-to-end request time", mw,
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.router_added = Histogram(
            "kvroute_router_added_seconds", "Time an answered request spent in kvroute itself: from "
            "its arrival to the call to the worker (queueing included), plus from the worker's "
            "first bytes to the client's (a stream's first event; a whole answer until the "
            "server starts writing it). First tries only", ["model"],
            buckets=_ADDED_BUCKETS, registry=r)
        self.decision = Histogram("kvroute_route_decision_seconds",
                                  "Time to choose a worker (policy select)", ["model"],
                                  buckets=_DECISION_BUCKETS, registry=r)
        self.tier_requests = Counter("kvroute_tier_requests", "Requests per model tier",
                                     ["model", "tier"], registry=r)
        self.classifier_seconds = Histogram("kvroute_classifier_seconds",
                                            "Time to score one batch with the tier classifier",
                                            ["model"], buckets=_DECISION_BUCKETS + (0.1, 0.25, 1.0),
                                            registry=r)
        # Online calibration and shadow mode of the tier classifier (router/calibration.py, tiers.py).
        self.classifier_threshold = Gauge("kvroute_classifier_threshold", "The tier classifier's live "
                                          "threshold (score at or above it: strong tier)", ["model"], registry=r)
        self.classifier_strong_share = Gauge("kvroute_classifier_strong_share", "Share of recent prompts the "
                                             "classifier sent to the strong tier (decayed over "
                                             "classifier.online.window)", ["model"], registry=r)
        self.shadow_agreement = Gauge("kvroute_classifier_shadow_agreement", "Share of recent prompts on "
                                      "which the shadow classifier's would-be tier matches the live one",
                                      ["model"], registry=r)
        self.would_be_strong = Counter("kvroute_classifier_would_be_strong", "Prompts each classifier "
                                       "sends (live) or would send (shadow) to the strong tier",
                                       ["model", "scorer"], registry=r)
        self.cascade_escalations = Counter("kvroute_cascade_escalations", "Cascade tries escalated to a "
                                           "stronger tier", ["model", "from", "to"], registry=r)
        self.cascade_wasted_tokens = Counter("kvroute_cascade_wasted_tokens", "Tokens (prompt + completion) "
                                             "of cascade tries whose answer was thrown away", ["model"], registry=r)
        self.kv_events = Counter("kvroute_kv_events", "vLLM KV events received, by type",
                                 ["worker", "type"], registry=r)
        self.kv_event_gaps = Counter("kvroute_kv_event_gaps", "Gaps in a worker's KV event sequence",
                                     ["worker"], registry=r)
        self.retries = Counter("kvroute_retries", "Requests retried on another worker",
                               ["model"], registry=r)
        self.retries_refused = Counter("kvroute_retries_refused", "Retries the retry table allowed but a bound "
                                       "refused: budget, attempts, no_worker, retry_after, deadline",
                                       ["model", "reason"], registry=r)
        self.breaker_state = Gauge("kvroute_worker_breaker_state", "Circuit breaker per worker: 0 closed, "
                                   "1 half-open, 2 open", mw, registry=r)
        self.errors = Counter("kvroute_errors", "Requests answered with a kvroute error",
                              ["code"], registry=r)
        # Admission control and drain (router/admission.py). scope: router (server.max_in_flight)
        # or worker (server.max_in_flight_per_worker).
        self.admitted_in_flight = Gauge("kvroute_in_flight_requests", "Completion requests admitted and "
                                        "not yet finished", registry=r)
        self.queued = Gauge("kvroute_queued_requests", "Requests waiting in the overload queue now",
                            registry=r)
        self.queued_total = Counter("kvroute_admission_queued", "Requests that waited in the overload queue",
                                    ["scope"], registry=r)
        self.queue_seconds = Histogram("kvroute_admission_queue_seconds", "Time requests waited in the "
                                       "overload queue, whatever the outcome", ["scope"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.refused = Counter("kvroute_admission_refused", "Requests refused with 503: over_limit, "
                               "workers_busy, queue_full, queue_timeout, shutting_down", ["reason"], registry=r)
        self.draining = Gauge("kvroute_draining", "1 while the router drains before it stops", registry=r)
        self.config_reloads = Counter("kvroute_config_reloads", "SIGHUP reloads of the config file: applied "
                                      "(a worker list or key changed), unchanged, failed (the file did not load)",
                                      ["result"], registry=r)
        self.stored_lookups = Counter("kvroute_stored_response_lookups", "Requests naming a stored response "
                                      "(previous_response_id, its retrieval or cancel), by how its worker was "
                                      "found: recorded (by this process), shared (in Redis, by any replica), asked "
                                      "(every worker asked, one held it), missing (none did), other_tenant",
                                      ["result"], registry=r)
        self.drain_cut = Counter("kvroute_drain_cut_requests", "In-flight requests cut at the end of "
                                 "server.drain_s", registry=r)
        # Cost governance (router/governance). Tag labels pass an allow-list; others read "other".
        spend = ["tenant", "agent", "feature", "model"]
        self.spend_usd = Counter("kvroute_spend_usd", "Dollars spent (settled)", spend, registry=r)
        self.spend_tokens = Counter("kvroute_spend_tokens", "Tokens spent (settled), by kind",
                                    spend + ["kind"], registry=r)
        self.budget_used_ratio = Gauge("kvroute_budget_used_ratio", "Used share of a budget instance at its "
                                       "last settlement; key is its tenant or tag value (through "
                                       "governance.tag_values), else other", ["budget", "key"], registry=r)
        self.alerts = Counter("kvroute_alerts", "Governance alerts raised", ["kind"], registry=r)
        self.webhooks = Counter("kvroute_alert_webhooks", "Alert webhook posts", ["outcome"], registry=r)
        self.webhook_dead_letters = Counter("kvroute_alert_dead_letters", "Alerts a webhook receiver never "
                                            "took (retries spent, or its queue full)", ["receiver"], registry=r)
        self.governance_actions = Counter("kvroute_governance_actions", "Governance decisions: reject, "
                                          "downgrade, throttle, kill_switch, loop_*, stream_cut, ...",
                                          ["action"], registry=r)
        self.store_errors = Counter("kvroute_store_errors", "Governance store (Redis) calls that failed or "
                                    "were skipped while it was down, by operation", ["op"], registry=r)
        # Reliability: scrapes of a worker's /metrics that failed, and requests routed
        # approximately although the model has a tokenizer (router/prefix.py).
        self.scrape_errors = Counter("kvroute_scrape_errors", "Scrapes of a worker's vLLM /metrics that "
                                     "failed (unreachable, timed out, bad status or page)", mw, registry=r)
        self.prefix_fallbacks = Counter("kvroute_prefix_fallbacks", "Requests of a model with a tokenizer "
                                        "routed approximately because templating or tokenizing failed",
                                        ["model", "reason"], registry=r)
        # The response cache (router/cache). kind: exact, semantic; result: hit, miss, bypass.
        self.cache_requests = Counter("kvroute_cache_requests", "Completion requests of a cached model, by what "
                                      "the response cache did: hit, miss, bypass", ["model", "kind", "result"],
                                      registry=r)
        self.cache_saved_tokens = Counter("kvroute_cache_saved_tokens", "Tokens (prompt + completion) of the "
                                          "answers replayed from the response cache", ["model", "kind"], registry=r)
        self.cache_saved_usd = Counter("kvroute_cache_saved_usd", "What the answers replayed from the response "
                                       "cache cost when a worker generated them", ["model", "kind"], registry=r)
        self.cache_entries = Gauge("kvroute_cache_entries", "Entries in this replica's in-process response cache",
                                   ["store"], registry=r)
        self.cache_bytes = Gauge("kvroute_cache_bytes", "Bytes held by this replica's in-process response cache",
                                 ["store"], registry=r)
        self.cache_errors = Counter("kvroute_cache_store_errors", "Response-cache store (Redis) calls that failed "
                                    "or were skipped while it was down, by operation", ["op"], registry=r)
        # The semantic cache: near misses the near-opposite check refused (reason: negation,
        # antonym, number, entity), and the entries in this replica's index.
        self.cache_semantic_vetoes = Counter("kvroute_cache_semantic_vetoes", "Semantic-cache candidates above "
                                             "the threshold that the near-opposite check refused",
                                             ["model", "reason"], registry=r)
        self.cache_semantic_entries = Gauge("kvroute_cache_semantic_entries", "Entries in this replica's "
                                            "semantic-cache index", ["model"], registry=r)
        # Per client request (router/telemetry): its tokens and cost, summed over its upstream
        # tries. agent and feature pass governance's tag allow-list; others read "other".
        per_request = ["model", "tier", "agent", "feature"]
        self.request_prompt_tokens = Histogram("kvroute_request_prompt_tokens", "Prompt tokens per request",
                                               per_request, buckets=_TOKEN_BUCKETS, registry=r)
        self.request_completion_tokens = Histogram("kvroute_request_completion_tokens", "Completion tokens per "
                                                   "request", per_request, buckets=_TOKEN_BUCKETS, registry=r)
        self.request_cost_usd = Histogram("kvroute_request_cost_usd", "Cost per request in USD", per_request,
                                          buckets=_USD_BUCKETS, registry=r)
        # Every metric labelled with a worker, with its label names, for forget_worker.
        self._by_model_worker: list[tuple[MetricWrapperBase, tuple[str, ...]]] = [
            (self.requests, (*mw, "status"))] + [(m, tuple(mw)) for m in (
                self.prompt_tokens, self.completion_tokens, self.cached_tokens, self.predicted_cached_tokens,
                self.in_flight, self.healthy, self.ttft, self.latency, self.breaker_state, self.scrape_errors)]
        self._by_worker: list[tuple[MetricWrapperBase, tuple[str, ...]]] = [
            (self.kv_events, ("worker", "type")), (self.kv_event_gaps, ("worker",))]
        self._series: dict[tuple[str, str], WorkerSeries] = {}

    def worker_series(self, model: str, url: str) -> WorkerSeries:
        """The per-request series of worker ``url`` in pool ``model``, bound on first use."""
        series = self._series.get((model, url))
        if series is None:
            series = self._series[(model, url)] = WorkerSeries(self, model, url)
        return series

    def join_worker(self, model: str, url: str, *, healthy: bool, breaker: int) -> None:
        """A worker joined a pool: its health and breaker series exist from now on."""
        self.healthy.labels(model, url).set(1 if healthy else 0)
        self.breaker_state.labels(model, url).set(breaker)

    def forget_worker(self, models: Iterable[str], url: str, *, everywhere: bool = True) -> None:
        """Remove every series of the worker at ``url`` labelled with one of ``models`` (a
        tier's workers are labelled ``model/tier`` on some series and ``model`` on others).
        ``everywhere``: no pool has the URL any more, so its KV-event series (labelled by
        worker alone) go too."""
        names = set(models)
        for key in [k for k in self._series if k[1] == url and k[0] in names]:
            del self._series[key]  # bound to series removed below: the next request binds anew
        for metric, labelnames in self._by_model_worker:
            _remove(metric, labelnames, lambda labels: labels["worker"] == url and labels["model"] in names)
        if everywhere:
            for metric, labelnames in self._by_worker:
                _remove(metric, labelnames, lambda labels: labels["worker"] == url)

    def event(self, worker: str, kind: str, n: int = 1) -> None:
        self.kv_events.labels(worker, kind).inc(n)

    def gap(self, worker: str) -> None:
        self.kv_event_gaps.labels(worker).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class WorkerSeries:
    """One worker's series in one pool, as a proxied request updates them."""

    def __init__(self, m: RouterMetrics, model: str, url: str):
        labels = (model, url)
        self._requests, self._labels = m.requests, labels
        self._by_status: dict[str, Any] = {}
        self.in_flight = m.in_flight.labels(*labels)
        self.predicted_cached_tokens = m.predicted_cached_tokens.labels(*labels)
        self.ttft = m.ttft.labels(*labels)
        self.latency = m.latency.labels(*labels)
        self.prompt_tokens = m.prompt_tokens.labels(*labels)
        self.completion_tokens = m.completion_tokens.labels(*labels)
        self.cached_tokens = m.cached_tokens.labels(*labels)
        self.router_added = m.router_added.labels(model)

    def requests(self, status: str) -> Any:
        """``kvroute_worker_requests`` for one outcome (``ok``, ``error``, an HTTP status)."""
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = self._requests.labels(*self._labels, status)
        return child


def _remove(metric: MetricWrapperBase, labelnames: tuple[str, ...],
            match: Callable[[dict[str, str]], bool]) -> None:
    """Remove the children of a labelled metric whose labels ``match``. They are found with
    ``collect()``, whose samples carry their child's labels (plus ``le`` on a histogram's
    buckets): ``remove_by_labels`` would do it, but needs prometheus_client 0.23."""
    children = set()
    for family in metric.collect():
        for sample in family.samples:
            if match(sample.labels):
                children.add(tuple(sample.labels[n] for n in labelnames))
    for values in children:
        metric.remove(*values)
