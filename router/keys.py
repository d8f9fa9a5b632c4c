"""Typed keys for the objects an app holds. Nothing is stored under string keys."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from kvroute.router.admission import Admission
from kvroute.router.cache.stage import ResponseCache
from kvroute.router.config import RouterConfig
from kvroute.router.governance.governor import Governor
from kvroute.router.metrics import RouterMetrics
from kvroute.router.routes import Executors, ModelRoutes
from kvroute.router.stored_responses import StoredResponses
from kvroute.router.telemetry import RequestRecord, Telemetry
from kvroute.router.upstream.health import HealthChecker

CONFIG = web.AppKey("config", RouterConfig)
CONFIG_PATH = web.AppKey("config_path", str)  # the file kvroute serve read; absent in quick mode (SIGHUP)
METRICS = web.AppKey("metrics", RouterMetrics)
SESSION = web.AppKey("session", aiohttp.ClientSession)
EXECUTORS = web.AppKey("executors", Executors)  # tokenizer, classifier, answer scorer
HEALTH = web.AppKey("health", HealthChecker)
ROUTES = web.AppKey("routes", ModelRoutes)
GOVERNOR = web.AppKey("governor", Governor)  # absent without a governance config
ADMISSION = web.AppKey("admission", Admission)  # in-flight bounds, the overload queue, drain
CACHE = web.AppKey("cache", ResponseCache)  # absent unless a model has a response cache
STORED_RESPONSES = web.AppKey("stored_responses", StoredResponses)  # which worker holds a response id
TELEMETRY = web.AppKey("telemetry", Telemetry)  # spans, prompt logs, per-request histograms
# Per request: what its stages decided, for its span and prompt-log line (router/telemetry).
RECORD = web.RequestKey("record", RequestRecord)
# Per request: its id (X-Request-Id), sent to the worker and back to the client.
REQUEST_ID = web.RequestKey("request_id", str)
# Per request answered with an error: the error's code, for the access log.
ERROR_CODE = web.RequestKey("error_code", str)
# Per request: when it reached the handler (perf_counter), taken by its first upstream try.
ARRIVED = web.RequestKey("arrived", float)
# Per request with a whole answer from its first try: the model's kvroute_router_added_seconds,
# the time before the worker call, and when the answer was read; observed when the server
# starts writing the response (proxy.on_response_prepare).
ROUTER_ADDED = web.RequestKey("router_added", tuple)
