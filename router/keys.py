"""Typed keys for the objects an app holds. Nothing is stored under string keys."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from kvroute.router.admission import Admission
from kvroute.router.config import RouterConfig
from kvroute.router.governance.governor import Governor
from kvroute.router.metrics import RouterMetrics
from kvroute.router.routes import Executors, ModelRoutes
from kvroute.router.upstream.health import HealthChecker

CONFIG = web.AppKey("config", RouterConfig)
METRICS = web.AppKey("metrics", RouterMetrics)
SESSION = web.AppKey("session", aiohttp.ClientSession)
EXECUTORS = web.AppKey("executors", Executors)  # tokenizer, classifier, answer scorer
HEALTH = web.AppKey("health", HealthChecker)
ROUTES = web.AppKey("routes", ModelRoutes)
GOVERNOR = web.AppKey("governor", Governor)  # absent without a governance config
ADMISSION = web.AppKey("admission", Admission)  # in-flight bounds, the overload queue, drain
