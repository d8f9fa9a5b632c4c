"""Worker discovery: where a model's vLLM workers are, as they come and go.

``make_discovery(cfg)`` returns a ``Discovery`` for ``discovery.source`` (``None`` for
``static``, whose workers are the config's URLs). A discovery's ``run(on_change)`` runs
until cancelled and calls ``on_change`` with the FULL current set of workers whenever the
set changes (and once after its first successful look-up, even when empty). It never
raises on transient failures: it logs, keeps the last known set and retries with backoff,
because dropping every worker on an API-server or DNS hiccup would fail all requests.

``k8s``: the pods of one namespace matching a label selector, read through the
Kubernetes API with ``kubernetes_asyncio`` (native asyncio, nothing blocks the loop). It
LISTs, then WATCHes from the list's resourceVersion, and re-LISTs from scratch when the
watch ends (server timeout or dropped connection), when it reports 410 Gone (history
compacted), after any error, and every ``resync_s`` in any case. A pod is a worker when it
has no ``deletionTimestamp``, has a ``podIP`` and its ``Ready`` condition is True; its
model and tier come from the ``model_label`` and ``tier_label`` labels. Only get/list/
watch on pods are used, which is all the chart's Role grants. Credentials come from
``cfg.kubeconfig`` when set, else the pod's service account (in-cluster config).

``dns``: each ``services`` entry ``model: "host:port"`` (typically a headless Service) is
resolved every ``interval_s`` with ``loop.getaddrinfo`` (the resolver runs in the loop's
executor, not on the loop); each IPv4 address is a worker. A name that does not exist
(no ready pods behind a headless Service) yields no workers; a failed look-up keeps the
model's previous workers.

Every wait (retry backoff, the resync deadline, the DNS interval) goes through the
``sleep`` a discovery is built with, ``asyncio.sleep`` by default; tests pass a fake
clock's, and move time forward instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kvroute.router.config import DiscoveryConfig

log = logging.getLogger(__name__)

OnChange = Callable[[list["DiscoveredWorker"]], None]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class DiscoveredWorker:
    url: str  # http://<podIP>:<port>
    model: str  # from model_label
    tier: str | None  # from tier_label


class Discovery(Protocol):
    async def run(self, on_change: OnChange) -> None:
        """Run until cancelled; call on_change with the FULL current set whenever it changes."""
        ...


def make_discovery(cfg: DiscoveryConfig) -> Discovery | None:
    """The discovery for ``cfg.source``; ``None`` for static workers."""
    if cfg.source == "static":
        return None
    if cfg.source == "dns":
        return DnsDiscovery(cfg)
    if cfg.source == "k8s":
        return K8sDiscovery(cfg)
    raise ValueError(f"unknown discovery source {cfg.source!r}")  # config validation prevents this


def worker_url(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip  # IPv6 literals need brackets in URLs
    return f"http://{host}:{port}"


class _Publisher:
    """Calls on_change only when the sorted, de-duplicated set differs from the last one."""

    def __init__(self, on_change: OnChange) -> None:
        self._on_change = on_change
        self._last: tuple[DiscoveredWorker, ...] | None = None

    def publish(self, workers: Iterable[DiscoveredWorker]) -> None:
        by_url = {w.url: w for w in workers}
        current = tuple(sorted(by_url.values(), key=lambda w: (w.model, w.url)))
        if current == self._last:
            return
        self._last = current
        try:
            self._on_change(list(current))
        except Exception:  # a bug in the consumer must not stop discovery
            log.exception("discovery on_change callback failed")


class _Backoff:
    def __init__(self, initial_s: float, max_s: float, sleep: Sleep) -> None:
        self.initial_s, self.max_s = initial_s, max_s
        self.delay_s = initial_s
        self._sleep = sleep

    def reset(self) -> None:
        self.delay_s = self.initial_s

    async def sleep(self) -> None:
        delay, self.delay_s = self.delay_s, min(self.delay_s * 2, self.max_s)
        await self._sleep(delay)


# ---- dns -----------------------------------------------------------------------------


# The name has no IPv4 address (as opposed to a resolver failure, EAI_AGAIN and others).
_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


class DnsDiscovery:
    def __init__(self, cfg: DiscoveryConfig, *, lookup_timeout_s: float = 5.0,
                 sleep: Sleep = asyncio.sleep) -> None:
        self._cfg = cfg
        self._timeout_s = lookup_timeout_s
        self._sleep = sleep
        self._targets: list[tuple[str, str, int]] = []
        for model, target in cfg.services.items():
            host, _, port = target.rpartition(":")
            self._targets.append((model, host.strip("[]"), int(port)))

    async def _resolve(self, host: str, port: int) -> list[str]:
        loop = asyncio.get_running_loop()
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_STREAM),
            self._timeout_s,
        )
        return sorted({str(info[4][0]) for info in infos})

    async def run(self, on_change: OnChange) -> None:
        publisher = _Publisher(on_change)
        known: dict[str, list[DiscoveredWorker]] = {}
        while True:
            results = await asyncio.gather(
                *(self._resolve(host, port) for _, host, port in self._targets),
                return_exceptions=True,
            )
            for (model, host, port), result in zip(self._targets, results):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if isinstance(result, socket.gaierror) and result.errno in _NO_SUCH_NAME:
                    known[model] = []  # the name is gone: no ready pods behind it
                elif isinstance(result, BaseException):
                    log.warning("dns discovery: resolving %s for model %s failed: %r; "
                                "keeping its previous workers", host, model, result)
                else:
                    known[model] = [DiscoveredWorker(worker_url(ip, port), model, None)
                                    for ip in result]
            if known:  # nothing is published before some look-up has succeeded
                publisher.publish(w for workers in known.values() for w in workers)
            await self._sleep(self._cfg.interval_s)


# ---- k8s -----------------------------------------------------------------------------


def pod_worker(pod: Mapping[str, Any], cfg: DiscoveryConfig) -> DiscoveredWorker | None:
    """The worker a pod (API JSON) stands for, or None when it should receive no traffic."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp"):
        return None
    ip = status.get("podIP")
    if not ip:
        return None
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
    )
    if not ready:
        return None
    labels = meta.get("labels") or {}
    model = labels.get(cfg.model_label)
    if not model:
        return None
    return DiscoveredWorker(worker_url(ip, cfg.port), model, labels.get(cfg.tier_label))


def _pod_key(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}"


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (410 Gone): LIST again."""


class K8sDiscovery:
    # Bounds each LIST page; a Kubernetes LIST of a labelled set of pods is small.
    list_page_size = 500
    list_timeout_s = 30.0
    # A watch that ends sooner than this counts as a failure for backoff purposes.
    min_watch_s = 1.0

    def __init__(
        self,
        cfg: DiscoveryConfig,
        *,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        min_watch_s: float | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._cfg = cfg
        self._sleep = sleep
        self._backoff = _Backoff(backoff_initial_s, backoff_max_s, sleep)
        if min_watch_s is not None:
            self.min_watch_s = min_watch_s

    async def _api_client(self) -> Any:
        from kubernetes_asyncio import client, config

        configuration = client.Configuration()
        if self._cfg.kubeconfig:
            await config.load_kube_config(
                config_file=self._cfg.kubeconfig,
                client_configuration=configuration,
                persist_config=False,
            )
        else:
            config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)

    async def run(self, on_change: OnChange) -> None:
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        api = await self._api_client()
        try:
            core = client.CoreV1Api(api)
            publisher = _Publisher(on_change)
            loop = asyncio.get_running_loop()
            while True:
                pods: dict[str, Mapping[str, Any]] = {}
                started = loop.time()
                try:
                    version = await self._list(core, pods)
                    publisher.publish(self._workers(pods))
                    started = loop.time()
                    # The resync deadline bounds the watch even if the connection silently dies.
                    if await self._until_resync(self._watch(core, version, pods, publisher)):
                        self._backoff.reset()
                        continue
                    # Watches end routinely (server timeout, API-server restart, idle
                    # proxies); back off only when they keep ending at once.
                    if loop.time() - started < self.min_watch_s:
                        await self._backoff.sleep()
                    else:
                        self._backoff.reset()
                    log.debug("k8s discovery: watch ended; re-listing")
                except TimeoutError:
                    log.warning("k8s discovery: API request timed out; retrying")
                    await self._backoff.sleep()
                except WatchExpired:
                    log.info("k8s discovery: watch expired (410 Gone); re-listing")
                    if loop.time() - started < self.min_watch_s:
                        await self._backoff.sleep()
                except ApiException as exc:
                    hint = ""
                    if exc.status in (401, 403):
                        hint = (f" (the router's service account needs get/list/watch on pods"
                                f" in namespace {self._cfg.namespace!r})")
                    log.warning("k8s discovery: API error %s %s%s; retrying",
                                exc.status, exc.reason, hint)
                    await self._backoff.sleep()
                except Exception as exc:  # noqa: BLE001 (connection errors, bad JSON, ...)
                    log.warning("k8s discovery: %r; retrying", exc)
                    await self._backoff.sleep()
        finally:
            await api.close()

    async def _until_resync(self, watch: Coroutine[Any, Any, None]) -> bool:
        """Run ``watch`` until it ends (False, or its error) or ``resync_s`` passes (True)."""
        watching = asyncio.ensure_future(watch)
        deadline = asyncio.ensure_future(self._sleep(self._cfg.resync_s))
        try:
            await asyncio.wait((watching, deadline), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            deadline.cancel()
            await asyncio.gather(watching, deadline, return_exceptions=True)
        if watching.cancelled():  # the deadline came first
            return True
        watching.result()  # the watch's own error, if it had one
        return False

    def _workers(self, pods: Mapping[str, Mapping[str, Any]]) -> list[DiscoveredWorker]:
        return [w for pod in pods.values() if (w := pod_worker(pod, self._cfg)) is not None]

    def _query(self) -> dict[str, Any]:
        return {"namespace": self._cfg.namespace, "label_selector": self._cfg.label_selector}

    async def _list(self, core: Any, pods: dict[str, Mapping[str, Any]]) -> str:
        """Fill ``pods`` with a full LIST; return the list's resourceVersion."""
        from kubernetes_asyncio.client.exceptions import ApiException

        cont: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": self.list_page_size}
            if cont:
                kwargs["_continue"] = cont
            resp = await core.list_namespaced_pod(
                **self._query(), **kwargs, _preload_content=False,
                _request_timeout=self.list_timeout_s,
            )
            async with resp:
                if resp.status != 200:
                    raise ApiException(status=resp.status, reason=await resp.text())
                body = await resp.json()
            for pod in body.get("items") or ():
                pods[_pod_key(pod)] = pod
            meta = body.get("metadata") or {}
            cont = meta.get("continue")
            if not cont:
                return str(meta.get("resourceVersion") or "")

    async def _watch(
        self,
        core: Any,
        version: str,
        pods: dict[str, Mapping[str, Any]],
        publisher: _Publisher,
    ) -> None:
        """Apply watch events to ``pods`` until the server ends the stream."""
        from kubernetes_asyncio.client.exceptions import ApiException

        resp = await core.list_namespaced_pod(
            **self._query(),
            watch=True,
            resource_version=version or None,
            allow_watch_bookmarks=True,
            # Server-side end of the watch, a little after our own resync deadline.
            timeout_seconds=int(self._cfg.resync_s) + 5,
            _preload_content=False,
        )
        async with resp:
            if resp.status == 410:
                raise WatchExpired()
            if resp.status != 200:
                raise ApiException(status=resp.status, reason=await resp.text())
            async for line in _lines(resp.content):
                event = json.loads(line)
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise WatchExpired()
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                if kind in ("ADDED", "MODIFIED"):
                    pods[_pod_key(obj)] = obj
                elif kind == "DELETED":
                    pods.pop(_pod_key(obj), None)
                else:  # BOOKMARK: only a newer resourceVersion, which we do not resume from
                    continue
                publisher.publish(self._workers(pods))


async def _lines(content: Any) -> AsyncIterator[bytes]:
    """Newline-delimited chunks of a streamed body; no per-line size limit (pods can be big)."""
    buf = b""
    async for chunk in content.iter_any():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip():
                yield line
    if buf.strip():
        # The connection dropped mid-event; the re-LIST that follows recovers it.
        log.debug("k8s discovery: watch ended inside an event (%d bytes dropped)", len(buf))
