"""The Helm chart helm/kvroute: lint, render, validate offline, and check what it renders.

Needs a helm binary: ``KVROUTE_HELM``, else ``~/.cache/kvroute/bin/helm`` (installed by
``python tools/get_helm.py``), else ``helm`` on PATH. Without one these tests FAIL with
that instruction; they never skip silently. Rendered manifests are validated against the
Kubernetes OpenAPI schemas shipped inside ``kubernetes-validate`` (no network), for the
oldest and a recent version this chart supports. Prometheus Operator kinds
(ServiceMonitor, PodMonitor) have no schema there and are checked structurally here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from kvroute.router.config import config_from_dict

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "kvroute"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
NS = "kvr-test"
RELEASE = "rel"
# Oldest supported (Chart.yaml kubeVersion >=1.27) and the helm 4 client's version.
K8S_VERSIONS = ("1.27.0", "1.35.0")
RELEASE_SCOPE = {"app.kubernetes.io/instance": RELEASE}
ROUTER_METRICS = (
    "kvroute_worker_requests_total", "kvroute_worker_prompt_tokens_total",
    "kvroute_worker_completion_tokens_total", "kvroute_worker_cached_prompt_tokens_total",
    "kvroute_worker_predicted_cached_tokens_total", "kvroute_worker_in_flight_requests",
    "kvroute_ttft_seconds", "kvroute_request_seconds", "kvroute_route_decision_seconds",
    "kvroute_tier_requests_total",
)
YAMLLINT_SOURCE = """
extends: default
rules:
  line-length: {max: 120}
  document-start: disable
  comments: {min-spaces-from-content: 1}
  truthy: {check-keys: false}
"""
# helm's toYaml writes unindented sequences; the dashboard JSON makes long lines.
YAMLLINT_RENDERED = """
extends: default
rules:
  line-length: disable
  document-start: disable
  indentation: {indent-sequences: whatever}
  comments: {min-spaces-from-content: 1}
  comments-indentation: disable
  truthy: {check-keys: false}
"""


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def template(helm: str, *args: str, release: str = RELEASE, chart: Path = CHART) -> str:
    return run_helm(helm, "template", release, str(chart), "--namespace", NS, *args).stdout


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


_cache: dict[tuple, list[dict]] = {}


def render(helm: str, values: Path | None = None, *sets: str, release: str = RELEASE) -> list[dict]:
    key = (values, sets, release)
    if key not in _cache:
        args = (["-f", str(values)] if values else []) + [a for s in sets for a in ("--set", s)]
        _cache[key] = docs(template(helm, *args, release=release))
    return _cache[key]


def ci(name: str) -> Path:
    return CHART / "ci" / f"{name}-values.yaml"


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str, component: str | None = None) -> dict:
    found = [o for o in by_kind(objs, kind) if component is None
             or o["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one {kind} ({component}), got {len(found)}"
    return found[0]


def workers(objs: list[dict]) -> list[dict]:
    return [d for d in by_kind(objs, "Deployment")
            if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"]


def router_config(objs: list[dict]):
    cm = one(objs, "ConfigMap", "router")
    return config_from_dict(yaml.safe_load(cm["data"]["config.yaml"]))


# ---- lint, render, validate ------------------------------------------------------------


def test_ci_values_present() -> None:
    names = {p.name for p in CI_VALUES}
    for needed in ("static", "k8s", "two-tiers", "monitoring"):
        assert f"{needed}-values.yaml" in names


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_lint_strict(helm, values) -> None:
    args = ["lint", "--strict", str(CHART), "--namespace", NS]
    if values:
        args += ["-f", str(values)]
    out = run_helm(helm, *args).stdout
    assert "0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out


@pytest.fixture(scope="session")
def rendered_files(helm, tmp_path_factory) -> list[Path]:
    """Every ci/*-values.yaml rendered to its own file (named after it)."""
    out_dir = tmp_path_factory.mktemp("rendered")
    files = []
    for values in CI_VALUES:
        out = out_dir / values.name
        out.write_text(template(helm, "-f", str(values)))
        files.append(out)
    return files


def test_rendered_manifests_validate(rendered_files) -> None:
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
    for v in K8S_VERSIONS:
        cmd += ["-k", v]
    proc = subprocess.run([*cmd, *map(str, rendered_files)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in proc.stdout.splitlines():
        # Only CRD kinds may lack a schema; everything else must have been validated.
        assert line.startswith("WARN") and "monitoring.coreos.com" in line, line


def test_validator_is_not_vacuous(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80}], "selectr": {"a": "b"}},
    }))
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", K8S_VERSIONS[0], str(bad)],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "selectr" in proc.stdout


def test_yamllint_sources() -> None:
    files = [CHART / "Chart.yaml", CHART / "values.yaml", *CI_VALUES]
    proc = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-d", YAMLLINT_SOURCE, *map(str, files)],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_yamllint_rendered(rendered_files) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-d", YAMLLINT_RENDERED,
         *map(str, rendered_files)],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- values schema -----------------------------------------------------------------------


@pytest.mark.parametrize("bad, where", [
    ("router.replicaCount=abc", "/router/replicaCount"),
    ("router.discovery.mode=ingress", "/router/discovery/mode"),
    ("router.logLevel=verbose", "/router/logLevel"),
    ("router.replicas=3", "replicas"),
    ("router.config.server.max_body_bytes=-1", "/router/config/server/max_body_bytes"),
    ("router.serviceMonitor.interval=often", "/router/serviceMonitor/interval"),
    ("workers[0].model=meta-llama/Llama-3.1-8B", "/workers/0/model"),
    ("workers[0].gpus=-1", "/workers/0/gpus"),
    ("workers[0].name=Has_Caps", "/workers/0/name"),
    ("workers[0].startupProbe.initialDelaySeconds=30", "initialDelaySeconds"),
    ("bogus=1", "bogus"),
])
def test_schema_rejects_bad_values(helm, bad, where) -> None:
    proc = run_helm(helm, "template", RELEASE, str(CHART), "--set", bad, check=False)
    assert proc.returncode != 0, f"--set {bad} was accepted"
    assert where in proc.stderr, proc.stderr


@pytest.mark.parametrize("values, sets, message", [
    ("dns", ["workers[1].name=b", "workers[1].model=qwen-0-5b"], "one worker group per model"),
    ("k8s", ["router.discovery.mode=static"], "needs workers: [URL, ...]"),
    ("k8s", ["workers=null"], "workers"),
    ("static", ["router.config.models=null"], "no models"),
])
def test_render_time_checks(helm, values, sets, message) -> None:
    args = ["-f", str(ci(values))] + [a for s in sets for a in ("--set", s)]
    proc = run_helm(helm, "template", RELEASE, str(CHART), *args, check=False)
    assert proc.returncode != 0, f"{values} + {sets} rendered"
    assert message in proc.stderr, proc.stderr


def test_packaged_chart_keeps_schema_and_dashboard(helm, tmp_path) -> None:
    run_helm(helm, "package", str(CHART), "--destination", str(tmp_path))
    (tgz,) = tmp_path.glob("kvroute-*.tgz")
    with tarfile.open(tgz) as tar:
        names = set(tar.getnames())
    for needed in ("values.schema.json", "dashboards/kvroute.json", "templates/NOTES.txt",
                   "ci/k8s-values.yaml"):
        assert f"kvroute/{needed}" in names, f".helmignore dropped {needed}"
    # And the packaged chart still enforces it.
    proc = run_helm(helm, "template", RELEASE, str(tgz), "--set", "router.replicaCount=abc",
                    check=False)
    assert proc.returncode != 0 and "/router/replicaCount" in proc.stderr


# ---- router config ---------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_router_config_is_valid(helm, values) -> None:
    objs = render(helm, values)
    cfg = router_config(objs)
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == 8080
    served = {d["spec"]["template"]["metadata"]["labels"]["kvroute.io/model"]
              for d in workers(objs)}
    assert served <= {m.name for m in cfg.models}
    if cfg.discovery.mode == "k8s":
        assert cfg.discovery.namespace == NS
        selector = dict(t.split("=", 1) for t in cfg.discovery.label_selector.split(","))
        assert selector["app.kubernetes.io/instance"] == RELEASE
        assert selector["app.kubernetes.io/component"] == "worker"
        for dep in workers(objs):  # the selector matches every worker pod of the release
            labels = dep["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items()
            assert labels[cfg.discovery.model_label] and labels[cfg.discovery.tier_label]
        port = {p["containerPort"] for d in workers(objs)
                for p in d["spec"]["template"]["spec"]["containers"][0]["ports"]
                if p["name"] == "http"}
        assert port <= {cfg.discovery.port}


def test_static_config(helm) -> None:
    objs = render(helm, ci("static"))
    cfg = router_config(objs)
    assert cfg.discovery.mode == "static" and not workers(objs)
    assert cfg.model("llama-8b").workers == ("http://vllm-0.vllm.inference.svc:8000",
                                             "http://vllm-1.vllm.inference.svc:8000")
    assert cfg.model("llama-8b").upstream_model == "meta-llama/Llama-3.1-8B-Instruct"
    assert not by_kind(objs, "Role")


def test_dns_config_points_at_headless_services(helm) -> None:
    objs = render(helm, ci("dns"))
    cfg = router_config(objs)
    assert cfg.discovery.mode == "dns"
    services = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}
    for target in cfg.discovery.services.values():
        host, port = target.rsplit(":", 1)
        name, ns = host.split(".")[:2]
        assert ns == NS and services[name]["spec"]["clusterIP"] == "None"
        assert int(port) in {p["port"] for p in services[name]["spec"]["ports"]}
    assert not by_kind(objs, "Role")


def test_config_change_rolls_router(helm) -> None:
    def checksum(objs):
        return one(objs, "Deployment", "router")["spec"]["template"]["metadata"][
            "annotations"]["checksum/config"]
    changed = render(helm, None, "router.config.health.interval_s=5")
    assert checksum(render(helm)) != checksum(changed)


# ---- RBAC ----------------------------------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_rbac_is_namespaced_read_only_pods(helm, values) -> None:
    objs = render(helm, values)
    assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ClusterRoleBinding")
    for role in by_kind(objs, "Role"):
        assert role["metadata"]["namespace"] == NS
        assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                                  "verbs": ["get", "list", "watch"]}]


def test_router_service_account_is_bound(helm) -> None:
    objs = render(helm, ci("k8s"))
    dep = one(objs, "Deployment", "router")
    sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
    assert dep["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert [s["metadata"]["name"] for s in by_kind(objs, "ServiceAccount")] == [sa]
    binding = one(objs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NS}]
    assert binding["roleRef"]["name"] == one(objs, "Role")["metadata"]["name"]
    # Without k8s discovery the router needs no API token at all.
    static = one(render(helm, ci("static")), "Deployment", "router")
    assert static["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


# ---- release scoping ---------------------------------------------------------------------


def _selectors(objs: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for o in objs:
        spec, kind = o.get("spec") or {}, o["kind"]
        if kind == "Service":
            out.append((f"Service/{o['metadata']['name']}", spec["selector"]))
        elif kind in ("Deployment", "PodDisruptionBudget", "ServiceMonitor", "PodMonitor"):
            out.append((f"{kind}/{o['metadata']['name']}", spec["selector"]["matchLabels"]))
    return out


def _pod_labels(objs: list[dict]) -> list[dict]:
    return [d["spec"]["template"]["metadata"]["labels"] for d in by_kind(objs, "Deployment")]


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_selectors_are_release_scoped(helm, values) -> None:
    mine = render(helm, values)
    theirs = render(helm, values, release="other")
    selectors = _selectors(mine)
    assert selectors
    for name, sel in selectors:
        assert RELEASE_SCOPE.items() <= sel.items(), f"{name} selector is not release-scoped"
        assert any(sel.items() <= labels.items() for labels in _pod_labels(mine)
                   + [s["metadata"]["labels"] for s in by_kind(mine, "Service")]), \
            f"{name} selects nothing in its own release"
        for labels in _pod_labels(theirs):
            assert not sel.items() <= labels.items(), f"{name} selects another release's pods"


def test_each_worker_service_selects_only_its_group(helm) -> None:
    objs = render(helm, ci("two-tiers"))
    svcs = [s for s in by_kind(objs, "Service")
            if s["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"]
    assert len(svcs) == 2
    for svc in svcs:
        assert svc["spec"]["clusterIP"] == "None"
        matched = [labels for labels in _pod_labels(objs)
                   if svc["spec"]["selector"].items() <= labels.items()]
        assert len(matched) == 1
        assert matched[0]["kvroute.io/tier"] == svc["metadata"]["labels"]["kvroute.io/tier"]


# ---- workers -------------------------------------------------------------------------


def _container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def test_worker_pods(helm) -> None:
    objs = render(helm, ci("two-tiers"))
    deps = {d["metadata"]["labels"]["kvroute.io/worker-group"]: d for d in workers(objs)}
    assert set(deps) == {"small", "large"}
    for group, gpus, tier, model in (("small", 1, "small", "llama-8b"),
                                     ("large", 4, "large", "llama-70b")):
        dep = deps[group]
        pod = dep["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert labels["kvroute.io/model"] == model and labels["kvroute.io/tier"] == tier
        assert labels["app.kubernetes.io/component"] == "worker"
        c = _container(dep)
        assert c["image"].startswith("vllm/vllm-openai:")
        assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus
        args = c["args"]
        assert "--enable-prefix-caching" in args
        assert args[args.index("--served-model-name") + 1] == model
        assert args[args.index("--port") + 1] == "8000"
        kv = json.loads(args[args.index("--kv-events-config") + 1])
        kv_port = 5557 if group == "small" else 5560
        assert kv == {"enable_kv_cache_events": True, "publisher": "zmq",
                      "endpoint": f"tcp://*:{kv_port}", "topic": "kv"}
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": 8000, "kv-events": kv_port}
        if gpus > 1:
            assert args[args.index("--tensor-parallel-size") + 1] == str(gpus)
        else:
            assert "--tensor-parallel-size" not in args
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
        assert "initialDelaySeconds" not in c["startupProbe"]
        assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 600
        spec = pod["spec"]
        vols = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert vols["dshm"]["emptyDir"]["medium"] == "Memory" and mounts["dshm"] == "/dev/shm"
        if group == "small":
            assert spec["runtimeClassName"] == "nvidia"
        else:
            assert "runtimeClassName" not in spec
        assert spec["enableServiceLinks"] is False  # no VLLM_PORT-style env injection
        # Chart or router upgrades must not restart GPU pods through their labels.
        assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels
    assert deps["large"]["spec"]["template"]["spec"]["volumes"][1]["persistentVolumeClaim"] == {
        "claimName": "llama-70b-weights"}
    assert _container(deps["large"])["startupProbe"]["failureThreshold"] == 360


def test_worker_defaults_omit_runtime_class_and_cache(helm) -> None:
    objs = render(helm)
    (dep,) = workers(objs)
    spec = dep["spec"]["template"]["spec"]
    assert "runtimeClassName" not in spec
    assert {"name": "model-cache", "emptyDir": {}} in spec["volumes"]
    assert not by_kind(objs, "PersistentVolumeClaim")


def test_kv_events_can_be_disabled(helm) -> None:
    (dep,) = workers(render(helm, ci("dns")))
    c = _container(dep)
    assert "--kv-events-config" not in c["args"]
    assert [p["name"] for p in c["ports"]] == ["http"]


def test_model_cache_pvc_and_hf_token(helm) -> None:
    objs = render(helm, ci("k8s"))
    (pvc,) = by_kind(objs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    (dep,) = workers(objs)
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["model-cache"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    env = {e["name"]: e for e in _container(dep)["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}


# ---- router objects ----------------------------------------------------------------------


def test_router_deployment(helm) -> None:
    objs = render(helm)
    dep = one(objs, "Deployment", "router")
    c = _container(dep)
    assert c["command"] + c["args"] == ["kvroute", "--log-level", "INFO", "serve", "--config",
                                        "/etc/kvroute/config.yaml"]
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/etc/kvroute"] == "config"
    cm = one(objs, "ConfigMap", "router")
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert dep["spec"]["replicas"] == 2
    svc = one(objs, "Service", "router")
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert one(objs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_hpa_owns_replicas(helm) -> None:
    objs = render(helm, ci("k8s"))
    dep = one(objs, "Deployment", "router")
    assert "replicas" not in dep["spec"]
    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 4)


def test_monitoring_objects(helm) -> None:
    objs = render(helm, ci("monitoring"))
    sm = one(objs, "ServiceMonitor")
    svc = one(objs, "Service", "router")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == "http"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    pm = one(objs, "PodMonitor")
    (dep,) = workers(objs)
    assert pm["spec"]["selector"]["matchLabels"].items() <= (
        dep["spec"]["template"]["metadata"]["labels"].items())
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    ing = one(objs, "Ingress")
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": svc["metadata"]["name"], "port": {"name": "http"}}


def test_no_monitoring_objects_by_default(helm) -> None:
    kinds = {o["kind"] for o in render(helm)}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "Ingress", "HorizontalPodAutoscaler"}


def test_grafana_dashboard(helm) -> None:
    objs = render(helm, ci("monitoring"))
    (cm,) = [c for c in by_kind(objs, "ConfigMap") if "kvroute.json" in c.get("data", {})]
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["kvroute.json"])
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", ()))
    for metric in ROUTER_METRICS:
        assert metric in exprs, metric
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("tokens", "hit rate", "time to first token", "tier", "error"):
        assert topic in titles, topic


def test_chart_test_pod(helm) -> None:
    objs = render(helm)
    (pod,) = by_kind(objs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = " ".join(pod["spec"]["containers"][0]["args"])
    svc = one(objs, "Service", "router")["metadata"]["name"]
    assert f"http://{svc}.{NS}.svc:8080/health" in script
    assert f"http://{svc}.{NS}.svc:8080/v1/models" in script


def test_notes(helm) -> None:
    proc = run_helm(helm, "install", RELEASE, str(CHART), "--namespace", NS,
                    "--dry-run=client", "-f", str(ci("monitoring")))
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert f"port-forward svc/{RELEASE}-kvroute-router 8080:8080" in notes
    assert "/metrics" in notes and "helm test" in notes
