"""Worker discovery against a fake Kubernetes API server and the real resolver.

The fake API server is an aiohttp app on 127.0.0.1 that serves the two calls a pod
watcher makes, in the real API's JSON shapes: LIST (``kind: PodList``) and WATCH
(newline-delimited ``{"type", "object"}`` events over a chunked response, resumable from
a resourceVersion, ``ERROR`` events with a 410 ``Status`` when expired). It filters by
label selector server-side and records every request, so the tests can check which
namespace, selector and verbs the client used, and compare the verbs with the Role the
Helm chart grants (rendered with the real helm binary, see tests/helm/test_chart.py).

Pods that "change silently" (no watch event) model missed events; only a re-LIST finds
them, which is how the tests tell a resync from a watch update.

Timers (the resync deadline, retry backoff, the DNS interval) run on a ``ManualClock``
where a test is about them: the test advances it instead of waiting. Elsewhere the real
sleep stays, with backoff kept short by ``fast``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from kvroute.router.config import DiscoveryConfig, config_from_dict
from kvroute.router.upstream.discovery import (
    DiscoveredWorker,
    DnsDiscovery,
    K8sDiscovery,
    make_discovery,
    pod_worker,
)
from tests.clock import ManualClock, until

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "kvroute"
NS = "kvr-test"
RELEASE = "rel"
MODEL_LABEL = "kvroute.io/model"
TIER_LABEL = "kvroute.io/tier"
WORKER_LABELS = {
    "app.kubernetes.io/name": "kvroute",
    "app.kubernetes.io/instance": RELEASE,
    "app.kubernetes.io/component": "worker",
}
SELECTOR = ",".join(f"{k}={v}" for k, v in WORKER_LABELS.items())


# ---- fake Kubernetes API ---------------------------------------------------------------


def make_pod(name: str, ip: str | None, *, ready: bool = True, model: str = "llama-8b",
             tier: str | None = "small", labels: dict | None = None,
             deleting: bool = False) -> dict:
    pod_labels = dict(WORKER_LABELS if labels is None else labels)
    pod_labels[MODEL_LABEL] = model
    if tier is not None:
        pod_labels[TIER_LABEL] = tier
    meta: dict = {
        "name": name, "namespace": NS, "uid": f"uid-{name}", "resourceVersion": "0",
        "labels": pod_labels, "creationTimestamp": "2026-01-01T00:00:00Z",
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:05:00Z"
        meta["deletionGracePeriodSeconds"] = 30
    status: dict = {
        "phase": "Running",
        "conditions": [
            {"type": "Initialized", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"},
            {"type": "ContainersReady", "status": "True" if ready else "False"},
        ],
    }
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {
        "kind": "Pod", "apiVersion": "v1", "metadata": meta,
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.11.0"}]},
        "status": status,
    }


def _selector_matches(selector: str, labels: dict) -> bool:
    for term in filter(None, selector.split(",")):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        else:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
    return True


class FakeKubeAPI:
    def __init__(self) -> None:
        self.pods: dict[str, dict] = {}
        self.rv = 100
        self.log: list[tuple[int, str, dict]] = []  # (rv, type, pod) for watch resumption
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.watch_queues: list[asyncio.Queue] = []
        self.lists = 0
        self.watches = 0
        self.forbidden = False  # answer 403, as without the Role
        self.auth: set[str | None] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self.pods_handler)
        app.router.add_route("*", "/{tail:.*}", self.other_handler)
        return app

    # -- mutations (event=False: a change the watch misses, only a re-LIST sees it)
    def put(self, pod: dict, *, event: bool = True) -> None:
        name = pod["metadata"]["name"]
        kind = "MODIFIED" if name in self.pods else "ADDED"
        self.rv += 1
        pod = json.loads(json.dumps(pod))
        pod["metadata"]["resourceVersion"] = str(self.rv)
        self.pods[name] = pod
        if event:
            self._emit(kind, pod)

    def delete(self, name: str, *, event: bool = True) -> None:
        pod = self.pods.pop(name)
        self.rv += 1
        if event:
            self._emit("DELETED", pod)

    def _emit(self, kind: str, pod: dict) -> None:
        self.log.append((self.rv, kind, pod))
        for q in self.watch_queues:
            q.put_nowait((kind, pod))

    async def watching(self, timeout: float = 5.0) -> None:
        """Wait until a watch is open (events sent before that are replayed, drops are not)."""
        await until(lambda: self.watch_queues, timeout)

    def end_watches(self) -> None:
        """The server closes every open watch cleanly (as on its timeout)."""
        for q in self.watch_queues:
            q.put_nowait(None)

    def abort_watches(self) -> None:
        for q in self.watch_queues:
            q.put_nowait("abort")

    def expire_watches(self) -> None:
        """Open watches get a 410 Expired ERROR event, as after etcd compaction."""
        for q in self.watch_queues:
            q.put_nowait(("ERROR", _status_410()))

    def verbs(self) -> set[tuple[str, str]]:
        """(resource, verb) pairs in RBAC terms for every recorded request."""
        out = set()
        for method, path, query in self.requests:
            parts = path.strip("/").split("/")
            if method == "GET" and parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 5:
                watching = query.get("watch", "").lower() in ("true", "1")
                out.add((parts[4], "watch" if watching else "list"))
            elif method == "GET" and len(parts) == 6:
                out.add((parts[4], "get"))
            else:
                out.add((path, method.lower()))
        return out

    # -- handlers
    async def other_handler(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, dict(request.query)))
        return web.json_response(
            {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
             "code": 404, "message": "not served by the fake"}, status=404)

    async def pods_handler(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path, dict(request.query)))
        self.auth.add(request.headers.get("Authorization"))
        ns = request.match_info["ns"]
        selector = request.query.get("labelSelector", "")
        if self.forbidden:
            return web.json_response(
                {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
                 "code": 403, "message": f'pods is forbidden: cannot list resource "pods" in '
                                         f'API group "" in the namespace "{ns}"'}, status=403)
        if request.query.get("watch", "").lower() in ("true", "1"):
            return await self._watch(request, ns, selector)
        self.lists += 1
        items = [p for p in self.pods.values()
                 if p["metadata"]["namespace"] == ns
                 and _selector_matches(selector, p["metadata"]["labels"])]
        items = [{k: v for k, v in p.items() if k not in ("kind", "apiVersion")} for p in items]
        meta = {"resourceVersion": str(self.rv)}
        start = int(request.query.get("continue") or 0)
        limit = int(request.query.get("limit") or 0)
        if limit:
            if start + limit < len(items):
                meta["continue"] = str(start + limit)
            items = items[start:start + limit]
        return web.json_response({
            "kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": items,
        })

    async def _watch(self, request: web.Request, ns: str, selector: str) -> web.StreamResponse:
        self.watches += 1
        since = int(request.query.get("resourceVersion") or self.rv)
        queue: asyncio.Queue = asyncio.Queue()
        for rv, kind, pod in self.log:
            if rv > since:
                queue.put_nowait((kind, pod))
        self.watch_queues.append(queue)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            while (item := await queue.get()) is not None:
                if item == "abort":  # connection lost mid-stream, half an event sent
                    await resp.write(b'{"type": "MODIFIED", "object": {"meta')
                    request.transport.close()
                    return resp
                kind, obj = item
                if kind != "ERROR" and not (
                    obj["metadata"]["namespace"] == ns
                    and _selector_matches(selector, obj["metadata"]["labels"])
                ):
                    continue
                await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
        finally:
            self.watch_queues.remove(queue)
        await resp.write_eof()
        return resp


def _status_410() -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version: 101 (150)", "reason": "Expired", "code": 410}


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "router", "user": {"token": "test-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "router",
                                                  "namespace": NS}}],
    }))
    return path


class Recorder:
    """Collects on_change calls; ``until`` waits for a set of URLs without sleeping blind."""

    def __init__(self) -> None:
        self.calls: list[list[DiscoveredWorker]] = []
        self._changed = asyncio.Event()

    def __call__(self, workers: list[DiscoveredWorker]) -> None:
        self.calls.append(workers)
        self._changed.set()

    @property
    def urls(self) -> set[str]:
        return {w.url for w in self.calls[-1]} if self.calls else set()

    async def until(self, pred: Callable[[set[str]], bool], timeout: float = 5.0) -> None:
        async def wait() -> None:
            while not (self.calls and pred(self.urls)):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)


def url(ip: str) -> str:
    return f"http://{ip}:8000"


@pytest.fixture
async def kube(aiohttp_server, tmp_path):
    fake = FakeKubeAPI()
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    fake.kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{server.port}")
    yield fake
    fake.end_watches()


def k8s_cfg(kubeconfig: Path | None, **kw) -> DiscoveryConfig:
    base = dict(source="k8s", namespace=NS, label_selector=SELECTOR, port=8000, resync_s=30.0,
                kubeconfig=str(kubeconfig) if kubeconfig else None)
    base.update(kw)
    return DiscoveryConfig(**base)


class running:
    """Run a discovery as a task; cancel and await it on exit, as the app does."""

    def __init__(self, discovery, recorder: Recorder) -> None:
        self.discovery, self.recorder = discovery, recorder

    async def __aenter__(self) -> asyncio.Task:
        self.task = asyncio.create_task(self.discovery.run(self.recorder))
        return self.task

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(self.task, 5)


def fast(cfg: DiscoveryConfig, clock: ManualClock | None = None) -> K8sDiscovery:
    """Short backoff; every wait (backoff, resync) on ``clock`` when one is given, else real."""
    return K8sDiscovery(cfg, backoff_initial_s=0.02, backoff_max_s=0.1, min_watch_s=0.0,
                        sleep=clock.sleep if clock is not None else asyncio.sleep)


# ---- pure ----------------------------------------------------------------------------


def test_pod_worker_rules() -> None:
    cfg = DiscoveryConfig(source="k8s")
    assert pod_worker(make_pod("a", "10.0.0.1"), cfg) == DiscoveredWorker(
        "http://10.0.0.1:8000", "llama-8b", "small")
    assert pod_worker(make_pod("a", "10.0.0.1", tier=None), cfg).tier is None
    assert pod_worker(make_pod("a", "10.0.0.1", ready=False), cfg) is None
    assert pod_worker(make_pod("a", None), cfg) is None
    assert pod_worker(make_pod("a", "10.0.0.1", deleting=True), cfg) is None
    no_model = make_pod("a", "10.0.0.1")
    del no_model["metadata"]["labels"][MODEL_LABEL]
    assert pod_worker(no_model, cfg) is None
    assert pod_worker(make_pod("a", "fd00::5"), cfg).url == "http://[fd00::5]:8000"


def test_make_discovery_sources(tmp_path) -> None:
    assert make_discovery(DiscoveryConfig(source="static")) is None
    assert isinstance(make_discovery(DiscoveryConfig(source="dns")), DnsDiscovery)
    assert isinstance(make_discovery(DiscoveryConfig(source="k8s")), K8sDiscovery)


# ---- k8s -----------------------------------------------------------------------------


async def test_ready_pods_join_and_leave(kube) -> None:
    kube.put(make_pod("a", "10.0.0.1"))
    kube.put(make_pod("b", "10.0.0.2", ready=False))
    kube.put(make_pod("c", "10.0.0.3", deleting=True))
    kube.put(make_pod("d", None))
    kube.put(make_pod("other-release", "10.0.0.9",
                      labels={**WORKER_LABELS, "app.kubernetes.io/instance": "other"}))
    rec = Recorder()
    async with running(fast(k8s_cfg(kube.kubeconfig)), rec):
        await rec.until(lambda u: u == {url("10.0.0.1")})
        assert rec.calls[-1] == [DiscoveredWorker(url("10.0.0.1"), "llama-8b", "small")]

        kube.put(make_pod("b", "10.0.0.2", ready=True, tier="large", model="llama-70b"))
        await rec.until(lambda u: u == {url("10.0.0.1"), url("10.0.0.2")})
        assert DiscoveredWorker(url("10.0.0.2"), "llama-70b", "large") in rec.calls[-1]

        kube.delete("a")
        await rec.until(lambda u: u == {url("10.0.0.2")})
        kube.put(make_pod("b", "10.0.0.2", ready=False))
        await rec.until(lambda u: u == set())
        kube.put(make_pod("e", "10.0.0.5", deleting=True))  # terminating pods never join
        kube.put(make_pod("f", "10.0.0.6"))
        await rec.until(lambda u: u == {url("10.0.0.6")})
    assert kube.lists == 1  # everything above came through the one watch
    (watch,) = [q for _, _, q in kube.requests if q.get("watch")]
    assert watch["resourceVersion"] == "105"  # resumes exactly where the LIST left off


async def test_paginated_list(kube) -> None:
    for i in range(5):
        kube.put(make_pod(f"p{i}", f"10.0.2.{i}"))
    discovery = fast(k8s_cfg(kube.kubeconfig))
    discovery.list_page_size = 2
    rec = Recorder()
    async with running(discovery, rec):
        await rec.until(lambda u: len(u) == 5)
    pages = [q for _, _, q in kube.requests if not q.get("watch")]
    assert [q.get("continue") for q in pages] == [None, "2", "4"]
    assert all(q["limit"] == "2" for q in pages)


async def test_dropped_watch_relists(kube) -> None:
    kube.put(make_pod("a", "10.0.0.1"))
    rec = Recorder()
    async with running(fast(k8s_cfg(kube.kubeconfig)), rec):
        await rec.until(lambda u: u == {url("10.0.0.1")})
        kube.put(make_pod("b", "10.0.0.2"), event=False)  # missed by the watch
        kube.delete("a", event=False)
        await kube.watching()
        kube.end_watches()
        await rec.until(lambda u: u == {url("10.0.0.2")})
        assert kube.lists >= 2
        kube.put(make_pod("c", "10.0.0.3"))  # and the new watch delivers events again
        await rec.until(lambda u: u == {url("10.0.0.2"), url("10.0.0.3")})


async def test_aborted_watch_connection_relists(kube) -> None:
    kube.put(make_pod("a", "10.0.0.1"))
    rec = Recorder()
    async with running(fast(k8s_cfg(kube.kubeconfig)), rec):
        await rec.until(lambda u: u == {url("10.0.0.1")})
        kube.put(make_pod("b", "10.0.0.2"), event=False)
        await kube.watching()
        kube.abort_watches()
        await rec.until(lambda u: u == {url("10.0.0.1"), url("10.0.0.2")})


async def test_forbidden_retries_until_allowed(kube, caplog) -> None:
    kube.put(make_pod("a", "10.0.0.1"))
    kube.forbidden = True
    rec = Recorder()
    clock = ManualClock()
    async with running(fast(k8s_cfg(kube.kubeconfig), clock), rec):
        for _ in range(2):  # refused: it backs off (on the clock) and asks again
            await clock.fire()
        await clock.sleeping()  # refused a third time
        assert len(kube.requests) == 3 and kube.lists == 0
        assert rec.calls == []  # nothing known yet: no (empty) set is published
        kube.forbidden = False
        await clock.fire()
        await rec.until(lambda u: u == {url("10.0.0.1")})
    assert "needs get/list/watch on pods" in caplog.text


async def test_watch_410_gone_relists(kube) -> None:
    kube.put(make_pod("a", "10.0.0.1"))
    rec = Recorder()
    async with running(fast(k8s_cfg(kube.kubeconfig)), rec):
        await rec.until(lambda u: u == {url("10.0.0.1")})
        kube.put(make_pod("b", "10.0.0.2"), event=False)
        await kube.watching()
        kube.expire_watches()
        await rec.until(lambda u: u == {url("10.0.0.1"), url("10.0.0.2")})
        assert kube.lists >= 2


async def test_periodic_resync_without_events(kube) -> None:
    kube.put(make_pod("a", "10.0.0.1"))
    rec = Recorder()
    clock = ManualClock()
    async with running(fast(k8s_cfg(kube.kubeconfig, resync_s=30.0), clock), rec):
        await rec.until(lambda u: u == {url("10.0.0.1")})
        kube.put(make_pod("b", "10.0.0.2"), event=False)
        assert await clock.fire() == 30.0  # the resync deadline, with the watch still open
        await rec.until(lambda u: u == {url("10.0.0.1"), url("10.0.0.2")})
        assert kube.lists == 2
        for _ in range(2):  # two more resyncs that change nothing...
            assert await clock.fire() == 30.0
        await until(lambda: kube.lists == 4)
    assert len(rec.calls) == 2  # ...call on_change no more: only real changes are published


async def test_api_unreachable_retries_and_cancels(tmp_path) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9")  # discard port
    rec = Recorder()
    clock = ManualClock()
    async with running(fast(k8s_cfg(kubeconfig), clock), rec) as task:
        for _ in range(4):  # each failed try backs off on the clock, then tries again
            await clock.fire()
        await clock.sleeping()
        assert not task.done()  # keeps retrying instead of dying
    assert rec.calls == []


async def test_empty_namespace_publishes_empty_set(kube) -> None:
    rec = Recorder()
    async with running(fast(k8s_cfg(kube.kubeconfig)), rec):
        await rec.until(lambda u: u == set())
        assert rec.calls == [[]]


async def test_in_cluster_config_uses_service_account(tmp_path, monkeypatch) -> None:
    """No kubeconfig: HTTPS to KUBERNETES_SERVICE_HOST with the pod's token and CA, as in a pod."""
    from kubernetes_asyncio.config import incluster_config

    openssl = shutil.which("openssl")
    assert openssl, "this test needs the openssl command to make a TLS certificate"
    cert, key = tmp_path / "ca.crt", tmp_path / "tls.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=kubernetes", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30)
    token = tmp_path / "token"
    token.write_text("sa-token")
    ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ssl_ctx.load_cert_chain(cert, key)

    fake = FakeKubeAPI()
    fake.put(make_pod("a", "10.0.0.1"))
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_ctx)
    await site.start()
    port = runner.addresses[0][1]
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(port))
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(cert))
    try:
        rec = Recorder()
        cfg = k8s_cfg(None)  # in-cluster
        async with running(fast(cfg), rec):
            await rec.until(lambda u: u == {url("10.0.0.1")})
        assert fake.auth == {"Bearer sa-token"}
    finally:
        fake.end_watches()
        await runner.cleanup()


# ---- the chart's Role and config are what discovery needs --------------------------------


@pytest.fixture(scope="module")
def rendered(helm) -> list[dict]:
    out = subprocess.run(
        [helm, "template", RELEASE, str(CHART), "--namespace", NS,
         "-f", str(CHART / "ci" / "two-tiers-values.yaml")],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


async def test_chart_role_and_selector_are_all_discovery_needs(kube, rendered) -> None:
    (role,) = [d for d in rendered if d["kind"] == "Role"]
    granted = {(res, verb) for rule in role["rules"] if rule["apiGroups"] == [""]
               for res in rule["resources"] for verb in rule["verbs"]}
    (cm,) = [d for d in rendered if d["kind"] == "ConfigMap" and "config.yaml" in d["data"]]
    cfg = config_from_dict(yaml.safe_load(cm["data"]["config.yaml"])).discovery
    assert cfg.namespace == role["metadata"]["namespace"] == NS

    # Pods labelled exactly as the chart's worker Deployments label them.
    workers = [d for d in rendered if d["kind"] == "Deployment"
               and d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"]
    assert len(workers) == 2
    for i, dep in enumerate(workers):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        pod = make_pod(f"w{i}", f"10.0.1.{i}", labels=labels,
                       model=labels[MODEL_LABEL], tier=labels[TIER_LABEL])
        kube.put(pod)
    kube.put(make_pod("foreign", "10.0.9.9",
                      labels={**WORKER_LABELS, "app.kubernetes.io/instance": "another"}))

    rec = Recorder()
    cfg = dataclasses.replace(cfg, kubeconfig=str(kube.kubeconfig))
    async with running(fast(cfg), rec):
        await rec.until(lambda u: len(u) == 2)
        await kube.watching()
        kube.end_watches()  # force a second LIST + WATCH so both verbs are exercised again
        await until(lambda: kube.watches >= 2)
    assert {(w.model, w.tier) for w in rec.calls[-1]} == {("auto", "small"), ("auto", "large")}

    assert kube.requests, "discovery made no requests"
    for method, path, query in kube.requests:
        assert method == "GET"
        assert path == f"/api/v1/namespaces/{NS}/pods"
        assert query["labelSelector"] == cfg.label_selector
    used = kube.verbs()
    assert used == {("pods", "list"), ("pods", "watch")}
    assert used <= granted, f"discovery uses {used - granted} that the chart's Role lacks"
    assert granted == {("pods", "get"), ("pods", "list"), ("pods", "watch")}


# ---- dns -----------------------------------------------------------------------------


async def test_dns_resolves_localhost() -> None:
    cfg = DiscoveryConfig(source="dns", services={"tiny": "localhost:8123"}, interval_s=0.05)
    rec = Recorder()
    clock = ManualClock()
    async with running(DnsDiscovery(cfg, sleep=clock.sleep), rec):
        await rec.until(lambda u: bool(u))
        for _ in range(3):  # a few more rounds with the same answer
            assert await clock.fire() == 0.05
        await clock.sleeping()  # the last of them has finished
    assert rec.calls == [[DiscoveredWorker("http://127.0.0.1:8123", "tiny", None)]]


async def test_dns_failures_keep_workers_and_missing_names_drop_them() -> None:
    answers: list = [["10.0.0.1", "10.0.0.2"],
                     socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
                     socket.gaierror(socket.EAI_NONAME, "Name or service not known")]

    class Scripted(DnsDiscovery):
        async def _resolve(self, host: str, port: int) -> list[str]:
            answer = answers[0] if len(answers) == 1 else answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    cfg = DiscoveryConfig(source="dns", services={"m": "svc.ns.svc.cluster.local:8000"},
                          interval_s=0.01)
    rec = Recorder()
    clock = ManualClock()
    async with running(Scripted(cfg, sleep=clock.sleep), rec):
        await rec.until(lambda u: len(u) == 2)
        await clock.fire()  # the EAI_AGAIN round
        await clock.fire()  # the EAI_NONAME round
        await rec.until(lambda u: u == set())
    assert [sorted(w.url for w in call) for call in rec.calls] == [
        [url("10.0.0.1"), url("10.0.0.2")],  # EAI_AGAIN kept these; no call in between
        [],
    ]
