"""Typed keys for the objects an app holds. Nothing is stored under string keys."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from kvroute.router.config import RouterConfig
from kvroute.router.fleet.health import HealthChecker
from kvroute.router.metrics import RouterMetrics

if TYPE_CHECKING:
    pass

CONFIG = web.AppKey("config", RouterConfig)
METRICS = web.AppKey("metrics", RouterMetrics)
SESSION = web.AppKey("session", aiohttp.ClientSession)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
HEALTH = web.AppKey("health", HealthChecker)
ROUTES = web.AppKey("routes", "ModelRoutes")
GOVERNOR = web.AppKey("governor", "Governor")  # router.governance; absent without governance config
