"""The Helm chart helm/kvroute: lint, render, validate offline, and check what it renders.

Needs a helm binary: ``KVROUTE_HELM``, else ``~/.cache/kvroute/bin/helm`` (installed by
``python tools/get_helm.py``), else ``helm`` on PATH. Without one these tests FAIL with
that instruction; they never skip silently. Rendered manifests are validated against the
Kubernetes OpenAPI schemas shipped inside ``kubernetes-validate`` (no network), for the
oldest and a recent version this chart supports. Prometheus Operator kinds
(ServiceMonitor, PodMonitor) have no schema there and are checked structurally here.
The router config the chart renders is checked by the router itself (``kvroute config
check``), and the values schema against the router's parser in test_schema.py.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from kvroute.router.upstream.discovery import pod_worker
from tests.helm.chart import (
    CHART,
    CI_VALUES,
    NS,
    RELEASE,
    SECRETS_DIR,
    by_kind,
    ci,
    config_check,
    container,
    model_named,
    one,
    raw_router_config,
    render,
    router_config,
    run_helm,
    secret_mounts,
    template,
    workers,
)

# Oldest supported (Chart.yaml kubeVersion >=1.27) and the helm 4 client's version.
K8S_VERSIONS = ("1.27.0", "1.35.0")
RELEASE_SCOPE = {"app.kubernetes.io/instance": RELEASE}
ROUTER_METRICS = (
    "kvroute_worker_requests_total", "kvroute_worker_prompt_tokens_total",
    "kvroute_worker_completion_tokens_total", "kvroute_worker_cached_prompt_tokens_total",
    "kvroute_worker_predicted_cached_tokens_total", "kvroute_worker_in_flight_requests",
    "kvroute_ttft_seconds", "kvroute_request_seconds", "kvroute_route_decision_seconds",
    "kvroute_tier_requests_total", "kvroute_spend_usd_total", "kvroute_spend_tokens_total",
    "kvroute_budget_used_ratio", "kvroute_alerts_total", "kvroute_cascade_escalations_total",
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


# ---- lint, render, validate ------------------------------------------------------------


def test_ci_values_present() -> None:
    names = {p.name for p in CI_VALUES}
    for needed in ("static", "k8s", "dns", "two-tiers", "monitoring", "production"):
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
    ("router.discovery.source=ingress", "/router/discovery/source"),
    ("router.discovery.mode=k8s", "additional properties 'mode'"),  # renamed: router.discovery.source
    ("router.logLevel=verbose", "/router/logLevel"),
    ("router.replicas=3", "replicas"),
    ("router.config.server.max_body_bytes=-1", "/router/config/server/max_body_bytes"),
    ("router.serviceMonitor.interval=often", "/router/serviceMonitor/interval"),
    ("workers[0].model=meta-llama/Llama-3.1-8B", "/workers/0/model"),
    ("workers[0].gpus=-1", "/workers/0/gpus"),
    ("workers[0].name=Has_Caps", "/workers/0/name"),
    ("workers[0].startupProbe.initialDelaySeconds=30", "initialDelaySeconds"),
    ("bogus=1", "bogus"),
    # The chart owns these parts of the router config.
    ("router.config.server.port=9000", "/router/config/server"),
    ("router.config.discovery.source=k8s", "/router/config"),
    # Router config types, at any depth.
    ("router.config.health.interval_s=often", "/router/config/health/interval_s"),
    ("router.config.log_prompts=false", "additional properties 'log_prompts'"),  # no such key (yet)
    ("router.config.models[0].name=m,router.config.models[0].policy=fastest", "/router/config/models/0/policy"),
    ("router.config.models[0].name=m,router.config.models[0].price.input_per_m=-1",
     "/router/config/models/0/price/input_per_m"),
    ("router.config.governance.budgets[0].name=b,router.config.governance.budgets[0].scope=team",
     "/router/config/governance/budgets/0/scope"),
    ("router.config.governance.kill_switch.ttl_s=10", "/router/config/governance/kill_switch/ttl_s"),
    ("router.config.governance.loops.ratio=1", "/router/config/governance/loops/ratio"),
    ("redis.enabled=maybe", "/redis/enabled"),
    ("redis.persistance.enabled=true", "persistance"),
    ("workers[0].apiKey.existingSecret=s,workers[0].apiKey.create=true", "/workers/0/apiKey"),
    ("workers[0].apiKey.secret=s", "/workers/0/apiKey"),
])
def test_schema_rejects_bad_values(helm, bad, where) -> None:
    proc = run_helm(helm, "template", RELEASE, str(CHART), "--set", bad, check=False)
    assert proc.returncode != 0, f"--set {bad} was accepted"
    assert where in proc.stderr, proc.stderr


@pytest.mark.parametrize("bad, where", [
    # Secrets are references, never literals in values (and so never in the ConfigMap).
    ({"admin_keys": ["sk-admin"]}, "/router/config/governance/admin_keys/0"),
    ({"tenants": [{"name": "a", "keys": ["sk-a"]}]}, "/router/config/governance/tenants/0/keys/0"),
    ({"alerts": {"webhook_url": "https://hooks.example/x"}}, "/router/config/governance/alerts/webhook_url"),
    ({"redis": {"url": "redis://r:6379", "password": "pw"}}, "/router/config/governance/redis/password"),
    ({"redis": {"url": "redis://:pw@r:6379/0"}}, "/router/config/governance/redis/url"),
    ({"admin_keys": [{"secretKeyRef": {"name": "s"}}]}, "/router/config/governance/admin_keys/0"),
    ({"admin_keys": [{"file": "/a", "env": "B"}]}, "/router/config/governance/admin_keys/0"),
])
def test_schema_rejects_literal_secrets(helm, tmp_path, bad, where) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"router": {"config": {"governance": bad}}}))
    proc = run_helm(helm, "template", RELEASE, str(CHART), "-f", str(values), check=False)
    assert proc.returncode != 0, f"{bad} was accepted"
    assert where in proc.stderr, proc.stderr


def test_schema_rejects_literal_api_key(helm) -> None:
    proc = run_helm(helm, "template", RELEASE, str(CHART), "-f", str(ci("static")),
                    "--set", "router.config.models[0].api_key=sk-1", check=False)
    assert proc.returncode != 0 and "/router/config/models/0/api_key" in proc.stderr, proc.stderr


PROD = "production"


@pytest.mark.parametrize("values, sets, message", [
    ("dns", ["workers[1].name=b", "workers[1].model=qwen-0-5b"], "one worker group per model"),
    ("k8s", ["router.discovery.source=static"], "needs workers: [URL, ...]"),
    ("k8s", ["workers=null"], "workers"),
    ("static", ["router.config.models=null"], "no models"),
    # Tiers: every tier needs a worker group and every group of a tiered model a tier.
    ("two-tiers", ["workers[1].tier=huge"], "tiers[large]: no workers[] group serves it"),
    ("two-tiers", ["workers[1].tier=huge", "workers[1].name=huge", "workers[2].name=large",
                   "workers[2].model=auto", "workers[2].tier=large"], "set tier to one of them"),
    ("two-tiers", ["router.config.models=null"], "add a router.config.models entry with tiers"),
    ("two-tiers", ["router.discovery.source=dns", "workers[1].model=other"], "a tiered model needs discovery k8s"),
    ("two-tiers", ["router.discovery.source=static"], "tier \"small\" needs workers: [URL, ...]"),
    ("k8s", ["router.config.models[0].name=nobody"], "models[nobody]: no workers[] group serves it"),
    # Worker wiring the router config must not contradict.
    (PROD, ["router.config.models[0].tiers[0].upstream_model=x"], "serve --served-model-name \"auto\""),
    (PROD, ["router.config.models[0].tiers[0].api_key.env=K"], "set from its worker groups' apiKey"),
    (PROD, ["workers[1].kvEvents.enabled=false"], "worker group \"large\" has kvEvents.enabled=false"),
    (PROD, ["router.config.models[0].tiers[1].kv_events.port=6000"], "publish on kvEvents port 5557"),
    ("two-tiers", ["workers[0].apiKey.existingSecret=a", "workers[2].name=small2", "workers[2].model=auto",
                   "workers[2].tier=small", "workers[2].apiKey.existingSecret=b"], "different apiKey Secrets"),
    ("k8s", ["router.config.models[0].chat_template=x"], "set from its worker groups' chatTemplate"),
    ("two-tiers", ["workers[0].chatTemplateKwargs.a=1", "workers[2].name=small2", "workers[2].model=auto",
                   "workers[2].tier=small"], "different chatTemplate or chatTemplateKwargs"),
    # Secrets and Redis.
    ("k8s", ["router.config.governance.admin_keys[0].secretKeyRef.key=k"], "set router.secrets.create=true"),
    ("k8s", ["router.config.governance.admin_keys[0].secretKeyRef.key=k", "router.secrets.create=true"],
     "router.secrets.stringData has no key \"k\""),
    ("k8s", ["redis.enabled=true"], "set router.config.governance"),
    (PROD, ["router.config.governance.redis.url=redis://elsewhere:6379"], "set by the chart when redis.enabled"),
    ("k8s", ["router.config.governance.redis.prefix=p"], "set url"),
    # LoRA adapters: an adapter on a tiered model's pods is configured by hand.
    ("two-tiers", ["workers[0].loraAdapters[0].name=sql", "workers[0].loraAdapters[0].path=/a"],
     "add \"sql\" to router.config.models with lora: true and workers_from: auto/TIER"),
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


def _pool_of(cfg, worker) -> str | None:
    """The pool key a discovered worker joins: ModelRegistry.apply_discovery's rule
    (router/pipeline.py): model/tier when that pool exists, else a plain model's pool."""
    pools = {p.key for m in cfg.models for p in m.pools}
    key = f"{worker.model}/{worker.tier}" if worker.tier else worker.model
    if key in pools:
        return key
    return worker.model if worker.model in pools else None


def _as_ready_pod(dep: dict, ip: str) -> dict:
    """What the API server reports for a Ready pod of this Deployment."""
    return {"metadata": {"labels": dep["spec"]["template"]["metadata"]["labels"], "uid": ip},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_router_config_is_valid(helm, values) -> None:
    objs = render(helm, values)
    cfg = router_config(objs)
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == 8080
    served = {d["spec"]["template"]["metadata"]["labels"]["kvroute.io/model"]
              for d in workers(objs)}
    assert served <= {m.name for m in cfg.models}
    if cfg.discovery.source == "k8s":
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


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_every_worker_group_lands_in_a_pool_that_it_serves(helm, values) -> None:
    """Run the router's own pod-to-worker mapping (router.upstream.discovery.pod_worker) on
    each worker group's pod: it must join a pool, every pool must get a group, and the
    pool must ask the pods for the model name they serve, with the key they require."""
    objs = render(helm, values)
    cfg = router_config(objs)
    if cfg.discovery.source != "k8s":
        return
    pools = {p.key: p for m in cfg.models for p in m.pools}
    joined: dict[str, list[dict]] = {}
    for i, dep in enumerate(workers(objs)):
        found = pod_worker(_as_ready_pod(dep, f"10.0.0.{i + 1}"), cfg.discovery)
        assert found is not None
        key = _pool_of(cfg, found)
        assert key is not None, f"{dep['metadata']['name']} serves no configured pool"
        joined.setdefault(key, []).append(dep)
    adapters = {key: p for key, p in pools.items() if p.workers_from is not None}
    assert set(joined) == set(pools) - set(adapters), "a pool has no worker group (or a group no pool)"
    for key, adapter in adapters.items():  # on its base pool's pods, which serve it by its name
        assert adapter.lora and adapter.workers_from in joined
        for dep in joined[adapter.workers_from]:
            args = container(dep)["args"]
            served = args[args.index("--lora-modules") + 1:]
            assert any(a.split("=", 1)[0] == adapter.served_name for a in served), (key, args)
            joined.setdefault(key, []).append(dep)  # ... and with the base pool's key
    mounts = secret_mounts(one(objs, "Deployment", "router"))
    raw = {p.key: p for p in pools.values()}
    for key, deps in joined.items():
        pool = raw[key]
        for dep in deps:
            c = container(dep)
            if pool.workers_from is None:
                assert c["args"][c["args"].index("--served-model-name") + 1] == pool.served_name
            env = {e["name"]: e for e in c.get("env", ())}
            if "VLLM_API_KEY" in env:
                ref = env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
                # The router reads the very same Secret key: {file: <mounted path>}.
                path = pool.api_key.removeprefix("<file:").removesuffix(">")
                assert mounts[path] == (ref["name"], ref["key"])
            else:
                assert pool.api_key is None


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_config_check_accepts_rendered_config(helm, values, tmp_path) -> None:
    """One source of truth: the router's `kvroute config check` (exactly what serve loads)
    accepts the config.yaml the chart renders for every example."""
    config = tmp_path / "config.yaml"
    config.write_text(one(render(helm, values), "ConfigMap", "router")["data"]["config.yaml"])
    proc = config_check(config)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok"), proc.stdout


def _dig(tree, path):
    for step in path:
        tree = tree[step]
    return tree


@pytest.mark.parametrize("router_key, path", [
    ("governance.budgets[0]", ["governance", "budgets", 0]),
    ("governance.budgets[3].limit", ["governance", "budgets", 3, "limit"]),
    ("models[0].tiers[0]", ["models", 0, "tiers", 0]),
    ("models[0].tiers[1].kv_events", ["models", 0, "tiers", 1, "kv_events"]),
    ("models[0].cascade", ["models", 0, "cascade"]),
    ("governance.alerts", ["governance", "alerts"]),
])
def test_typo_fails_schema_and_config_check(helm, tmp_path, router_key, path) -> None:
    """A misspelled key anywhere in router.config fails `helm install` (the schema); with
    the schema bypassed the chart passes it through, and the router's check names it."""
    values = yaml.safe_load(ci(PROD).read_text())
    _dig(values["router"]["config"], path)["scpoe"] = "x"
    vf = tmp_path / "values.yaml"
    vf.write_text(yaml.safe_dump(values))
    args = ["template", RELEASE, str(CHART), "--namespace", NS, "-f", str(vf)]
    proc = run_helm(helm, *args, check=False)
    pointer = "/".join(["/router/config", *map(str, path)])
    assert proc.returncode != 0, "the schema accepted a typo"
    assert f"at '{pointer}': additional properties 'scpoe' not allowed" in proc.stderr, proc.stderr

    objs = [d for d in yaml.safe_load_all(run_helm(helm, *args, "--skip-schema-validation").stdout) if d]
    config = raw_router_config(objs)
    assert _dig(config, path)["scpoe"] == "x"
    cfile = tmp_path / "config.yaml"
    cfile.write_text(yaml.safe_dump(config))
    proc = config_check(cfile)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"kvroute: config key '{router_key}.scpoe': unknown key"), proc.stderr


def test_static_config(helm) -> None:
    objs = render(helm, ci("static"))
    cfg = router_config(objs)
    assert cfg.discovery.source == "static" and not workers(objs)
    llama = model_named(cfg, "llama-8b")
    assert llama.workers == ("http://vllm-0.vllm.inference.svc:8000", "http://vllm-1.vllm.inference.svc:8000")
    assert llama.upstream_model == "meta-llama/Llama-3.1-8B-Instruct"
    assert not by_kind(objs, "Role")


def test_dns_config_points_at_headless_services(helm) -> None:
    objs = render(helm, ci("dns"))
    cfg = router_config(objs)
    assert cfg.discovery.source == "dns"
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
        elif kind == "NetworkPolicy":
            out.append((f"{kind}/{o['metadata']['name']}", spec["podSelector"]["matchLabels"]))
            for rule in spec["ingress"]:
                for peer in rule["from"]:
                    out.append((f"{kind}/{o['metadata']['name']} from", peer["podSelector"]["matchLabels"]))
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


def test_worker_pods(helm) -> None:
    objs = render(helm, ci("two-tiers"))
    deps = {d["metadata"]["labels"]["kvroute.io/worker-group"]: d for d in workers(objs)}
    assert set(deps) == {"small", "large"}
    # One tiered model: both groups serve "auto", the tier label tells them apart.
    for group, gpus, tier, model in (("small", 1, "small", "auto"),
                                     ("large", 4, "large", "auto")):
        dep = deps[group]
        pod = dep["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert labels["kvroute.io/model"] == model and labels["kvroute.io/tier"] == tier
        assert labels["app.kubernetes.io/component"] == "worker"
        c = container(dep)
        assert c["image"].startswith("vllm/vllm-openai:")
        assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus
        args = c["args"]
        assert "--enable-prefix-caching" in args
        assert "--enable-prompt-tokens-details" in args  # usage...cached_tokens: hit-rate metrics
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
    assert container(deps["large"])["startupProbe"]["failureThreshold"] == 360


def test_lora_adapters_are_served_by_the_group_and_routed_on_its_pods(helm) -> None:
    objs = render(helm, ci("k8s"))
    args = container(workers(objs)[0])["args"]
    assert "--enable-lora" in args and args[args.index("--max-loras") + 1] == "2"
    assert args[args.index("--max-lora-rank") + 1] == "32"
    modules = args[args.index("--lora-modules") + 1:args.index("--lora-modules") + 3]
    assert modules == ["llama-8b-sql=/root/.cache/huggingface/adapters/sql",
                       "llama-8b-support=/root/.cache/huggingface/adapters/support"]
    cfg = router_config(objs)
    base = model_named(cfg, "llama-8b")
    for name in ("llama-8b-sql", "llama-8b-support"):
        adapter = model_named(cfg, name)
        assert adapter.lora and adapter.workers_from == "llama-8b" and adapter.served_name == name
        # the base model's entry otherwise: exact mode on the same events, the same price
        assert adapter.tokenizer == base.tokenizer and adapter.kv_events == base.kv_events is not None
        assert adapter.price == base.price
    assert all("--enable-lora" not in container(w)["args"] for w in workers(render(helm, ci("two-tiers"))))


def test_worker_defaults_omit_runtime_class_and_cache(helm) -> None:
    objs = render(helm)
    (dep,) = workers(objs)
    spec = dep["spec"]["template"]["spec"]
    assert "runtimeClassName" not in spec
    assert {"name": "model-cache", "emptyDir": {}} in spec["volumes"]
    assert not by_kind(objs, "PersistentVolumeClaim")


def test_kv_events_can_be_disabled(helm) -> None:
    (dep,) = workers(render(helm, ci("dns")))
    c = container(dep)
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
    env = {e["name"]: e for e in container(dep)["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}


# ---- router objects ----------------------------------------------------------------------


def test_router_deployment(helm) -> None:
    objs = render(helm)
    dep = one(objs, "Deployment", "router")
    c = container(dep)
    assert c["command"] + c["args"] == ["kvroute", "--log-level", "INFO", "--log-format", "text", "serve",
                                        "--config", "/etc/kvroute/config.yaml"]
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http", "scheme": "HTTP"}  # 503 draining
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http", "scheme": "HTTP"}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/etc/kvroute"] == "config"
    cm = one(objs, "ConfigMap", "router")
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    # Defaults reference no Secret: the projected volume holds the ConfigMap alone.
    assert vols["config"]["projected"]["sources"] == [{"configMap": {"name": cm["metadata"]["name"]}}]
    assert dep["spec"]["replicas"] == 2
    # The image built from the repo's Dockerfile, tagged with the chart's appVersion.
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert c["image"] == f"ghcr.io/kvroute/kvroute:{app_version}"
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


def test_a_router_serving_tls_is_probed_scraped_and_tested_over_https(helm) -> None:
    """``router.config.server.tls`` (production example): kubelet, Prometheus and ``helm
    test`` speak HTTPS to it, and the router reads the mounted certificate."""
    values = ci("production")
    objs = render(helm, values)
    c = container(one(objs, "Deployment", "router"))
    assert c["readinessProbe"]["httpGet"]["scheme"] == c["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert c["args"][:4] == ["--log-level", "INFO", "--log-format", "json"]
    cfg = router_config(objs)
    assert cfg.server.tls is not None
    mounted = {m["mountPath"] for m in c["volumeMounts"]}
    assert str(Path(cfg.server.tls.cert_file).parent) in mounted
    (endpoint,) = one(objs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"]["ca"]["secret"]["key"] == "ca.crt"
    (pod,) = by_kind(objs, "Pod")
    script = " ".join(pod["spec"]["containers"][0]["args"])
    svc = one(objs, "Service", "router")["metadata"]["name"]
    assert f"curl -k -fsS --retry 5 --retry-connrefused --max-time 10 https://{svc}.{NS}.svc:8080/health" in script
    proc = run_helm(helm, "install", RELEASE, str(CHART), "--namespace", NS, "--dry-run=client", "-f", str(values))
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "curl https://127.0.0.1:8080/health" in notes and "--cacert" in notes
    # Without server.tls the ServiceMonitor keeps Prometheus' default, plain HTTP.
    assert "scheme" not in one(render(helm, ci("monitoring")), "ServiceMonitor")["spec"]["endpoints"][0]


def test_notes(helm) -> None:
    proc = run_helm(helm, "install", RELEASE, str(CHART), "--namespace", NS,
                    "--dry-run=client", "-f", str(ci("monitoring")))
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert f"port-forward svc/{RELEASE}-kvroute-router 8080:8080" in notes
    assert "/metrics" in notes and "helm test" in notes


# ---- secrets ---------------------------------------------------------------------------


def _secret_refs(cfg: dict) -> list[tuple[str, object]]:
    """Every place in a rendered router config that holds a secret, with its value."""
    out = []
    for i, m in enumerate(cfg["models"]):
        for j, pool in enumerate(m.get("tiers") or [m]):
            if "api_key" in pool:
                out.append((f"models[{i}].tiers[{j}].api_key" if m.get("tiers") else f"models[{i}].api_key",
                            pool["api_key"]))
    gov = cfg.get("governance") or {}
    out += [(f"governance.admin_keys[{i}]", k) for i, k in enumerate(gov.get("admin_keys") or [])]
    for i, t in enumerate(gov.get("tenants") or []):
        out += [(f"governance.tenants[{i}].keys[{j}]", k) for j, k in enumerate(t["keys"])]
    if "webhook_url" in (gov.get("alerts") or {}):
        out.append(("governance.alerts.webhook_url", gov["alerts"]["webhook_url"]))
    out += [(f"governance.alerts.webhooks[{i}].url", h["url"])
            for i, h in enumerate((gov.get("alerts") or {}).get("webhooks") or [])]
    if "password" in (gov.get("redis") or {}):
        out.append(("governance.redis.password", gov["redis"]["password"]))
    return out


def test_production_secrets_are_mounted_files(helm) -> None:
    objs = render(helm, ci(PROD))
    cfg = raw_router_config(objs)
    mounts = secret_mounts(one(objs, "Deployment", "router"))
    refs = _secret_refs(cfg)
    assert {k.split("[")[0].split(".")[0] for k, _ in refs} == {"models", "governance"}
    # worker api keys (two tiers, embed), admin, tenant keys, webhooks, redis password
    assert len(refs) == 3 + 1 + 3 + 2 + 1
    for key, value in refs:
        assert set(value) == {"file"}, f"{key} is not a file reference: {value}"
        assert value["file"].startswith(SECRETS_DIR + "/")
        assert value["file"] in mounts, f"{key}: {value['file']} is not mounted"
    # Each Secret key is mounted once, from the Secret the values name.
    assert mounts[f"{SECRETS_DIR}/kvroute-tenant-keys/acme-ci"] == ("kvroute-tenant-keys", "acme-ci")
    assert mounts[f"{SECRETS_DIR}/kvroute-alerts/webhook-url"] == ("kvroute-alerts", "webhook-url")
    assert set(mounts) == {v["file"] for _, v in refs}
    # The config volume is read-only and holds config.yaml beside secrets/.
    c = container(one(objs, "Deployment", "router"))
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "config"]
    assert mount == {"name": "config", "mountPath": "/etc/kvroute", "readOnly": True}
    # Nothing names a Secret the chart does not make or the values do not name.
    made = {s["metadata"]["name"] for s in by_kind(objs, "Secret")}
    assert {name for name, _ in mounts.values()} - made == {
        "kvroute-tenant-keys", "kvroute-admin-keys", "kvroute-alerts", "kvroute-vllm-api-key"}


def test_chart_made_router_secret(helm) -> None:
    objs = render(helm, ci("k8s"), "router.secrets.create=true", "router.secrets.stringData.adm=sk-admin-1",
                  "router.config.governance.admin_keys[0].secretKeyRef.key=adm")
    (secret,) = [s for s in by_kind(objs, "Secret") if s["metadata"]["name"] == f"{RELEASE}-kvroute-router-secrets"]
    assert secret["stringData"] == {"adm": "sk-admin-1"}
    path = f"{SECRETS_DIR}/{RELEASE}-kvroute-router-secrets/adm"
    assert raw_router_config(objs)["governance"]["admin_keys"] == [{"file": path}]
    assert secret_mounts(one(objs, "Deployment", "router"))[path] == (secret["metadata"]["name"], "adm")
    # The secret itself is in no ConfigMap.
    assert all("sk-admin-1" not in json.dumps(cm["data"]) for cm in by_kind(objs, "ConfigMap"))


def test_static_fleet_api_key_and_env_references(helm) -> None:
    objs = render(helm, ci("static"), "router.config.models[1].api_key.env=UPSTREAM_KEY")
    models = raw_router_config(objs)["models"]
    # secretKeyRef: a mounted file; {env: ...} and {file: ...} pass through untouched.
    path = f"{SECRETS_DIR}/vllm-fleet-key/api-key"
    assert models[0]["api_key"] == {"file": path} and models[1]["api_key"] == {"env": "UPSTREAM_KEY"}
    assert secret_mounts(one(objs, "Deployment", "router")) == {path: ("vllm-fleet-key", "api-key")}
    objs = render(helm, ci("static"), "router.config.models[1].api_key.file=/mnt/key")
    assert raw_router_config(objs)["models"][1]["api_key"] == {"file": "/mnt/key"}


def test_worker_api_key_from_existing_secret(helm) -> None:
    objs = render(helm, ci(PROD))
    cfg = router_config(objs)
    for dep in workers(objs):
        env = {e["name"]: e for e in container(dep)["env"]}
        assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "kvroute-vllm-api-key",
                                                                    "key": "api-key"}
        assert not any("--api-key" in a for a in container(dep)["args"])  # never in the pod spec
    for tier in (*model_named(cfg, "auto").tiers, *model_named(cfg, "embed").pools):
        assert tier.api_key == f"<file:{SECRETS_DIR}/kvroute-vllm-api-key/api-key>"
    assert not [s for s in by_kind(objs, "Secret") if "api-key" in s["metadata"]["name"]]


def test_worker_api_key_chart_made(helm) -> None:
    objs = render(helm, ci("two-tiers"), "workers[0].apiKey.create=true", "workers[1].apiKey.create=true",
                  "workers[1].apiKey.key=large")
    (secret,) = [s for s in by_kind(objs, "Secret") if s["metadata"]["name"] == f"{RELEASE}-kvroute-worker-api-key"]
    assert set(secret["data"]) == {"api-key", "large"}
    for value in secret["data"].values():
        assert len(base64.b64decode(value)) == 40
    deps = {d["metadata"]["labels"]["kvroute.io/worker-group"]: d for d in workers(objs)}
    mounts = secret_mounts(one(objs, "Deployment", "router"))
    tiers = {t["name"]: t for t in raw_router_config(objs)["models"][0]["tiers"]}
    for group, key in (("small", "api-key"), ("large", "large")):
        env = {e["name"]: e for e in container(deps[group])["env"]}
        ref = env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": key}
        assert mounts[tiers[group]["api_key"]["file"]] == (ref["name"], ref["key"])


def test_no_api_key_by_default(helm) -> None:
    objs = render(helm)
    (dep,) = workers(objs)
    assert "VLLM_API_KEY" not in {e["name"] for e in container(dep)["env"]}
    assert "api_key" not in raw_router_config(objs)["models"][0]
    assert not by_kind(objs, "Secret")


# ---- redis -----------------------------------------------------------------------------


def test_in_chart_redis(helm) -> None:
    objs = render(helm, ci(PROD))
    dep = one(objs, "Deployment", "redis")
    svc = one(objs, "Service", "redis")
    secret = one(objs, "Secret", "redis")
    c = container(dep)
    assert c["image"].startswith("redis:")
    assert c["command"] == ["redis-server"] and c["args"][:2] == ["--requirepass", "$(REDIS_PASSWORD)"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == {"name": secret["metadata"]["name"],
                                                             "key": "redis-password"}
    assert len(base64.b64decode(secret["data"]["redis-password"])) == 40
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    # persistence.enabled: the chart's PVC holds /data.
    (pvc,) = by_kind(objs, "PersistentVolumeClaim")
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "2Gi"
    # The router's governance.redis points at the Service, with the password as a file.
    redis = raw_router_config(objs)["governance"]["redis"]
    port = svc["spec"]["ports"][0]["port"]
    assert redis["url"] == f"redis://{svc['metadata']['name']}.{NS}.svc.cluster.local:{port}/0"
    assert redis["prefix"] == "kvroute:prod"
    mounts = secret_mounts(one(objs, "Deployment", "router"))
    assert mounts[redis["password"]["file"]] == (secret["metadata"]["name"], "redis-password")


def test_redis_network_policy_admits_only_router_pods(helm) -> None:
    objs = render(helm, ci(PROD))
    policy = one(objs, "NetworkPolicy", "redis")
    spec = policy["spec"]
    pods = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]["metadata"]["labels"]
            for d in by_kind(objs, "Deployment")}
    assert spec["podSelector"]["matchLabels"].items() <= pods["redis"].items()
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # no namespaceSelector: this namespace only
    admitted = [c for c, labels in pods.items() if peer["podSelector"]["matchLabels"].items() <= labels.items()]
    assert admitted == ["router"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]


def test_redis_existing_secret_and_no_persistence(helm) -> None:
    objs = render(helm, ci(PROD), "redis.auth.existingSecret=my-redis", "redis.auth.key=pw",
                  "redis.persistence.enabled=false", "redis.networkPolicy.enabled=false")
    assert not [s for s in by_kind(objs, "Secret") if "redis" in s["metadata"]["name"]]
    assert not by_kind(objs, "PersistentVolumeClaim") and not by_kind(objs, "NetworkPolicy")
    dep = one(objs, "Deployment", "redis")
    assert {"name": "data", "emptyDir": {}} in dep["spec"]["template"]["spec"]["volumes"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(dep)["env"]}
    assert env["REDIS_PASSWORD"] == {"name": "my-redis", "key": "pw"}
    password = raw_router_config(objs)["governance"]["redis"]["password"]
    assert password == {"file": f"{SECRETS_DIR}/my-redis/pw"}


def test_external_redis(helm) -> None:
    objs = render(helm, ci("k8s"), "router.config.governance.redis.url.secretKeyRef.name=ext-redis",
                  "router.config.governance.redis.url.secretKeyRef.key=url")
    assert not [o for o in objs if o["metadata"]["labels"].get("app.kubernetes.io/component") == "redis"]
    assert raw_router_config(objs)["governance"]["redis"] == {"url": {"file": f"{SECRETS_DIR}/ext-redis/url"}}


# ---- tiers -----------------------------------------------------------------------------


def test_two_tiers_is_one_tiered_model(helm) -> None:
    cfg = router_config(render(helm, ci("two-tiers")))
    (model,) = cfg.models
    assert model.name == "auto" and [t.tier for t in model.tiers] == ["small", "large"]
    assert model.classifier is not None and model.classifier.online is not None
    assert model.classifier.online.target_strong_share == 0.3
    assert [t.served_name for t in model.tiers] == ["auto", "auto"]


def test_production_model(helm) -> None:
    objs = render(helm, ci(PROD))
    cfg = router_config(objs)
    model, embed = cfg.models
    # an embedding fleet beside the chat tiers: vLLM's pooling runner, routed by prefix
    embedders = next(d for d in workers(objs) if "--runner" in container(d)["args"])
    args = container(embedders)["args"]
    assert args[args.index("--runner") + 1] == "pooling" and embed.pools[0].policy == "prefix"
    assert model.mode == "cascade" and model.cascade is not None and model.classifier is not None
    small, large = model.tiers
    # kv_events port and topic come from the worker groups' kvEvents.
    assert (small.kv_events.port, small.kv_events.topic) == (5557, "kv")
    assert large.kv_events.port == 5557 and large.price.output_per_m == 0.8
    gov = cfg.governance
    assert [t.name for t in gov.tenants] == ["acme", "globex"] and len(gov.admin_keys) == 1
    assert {b.name for b in gov.budgets} >= {"per-call", "session", "acme-day", "org-hour"}
    assert gov.alerts.webhook_url and gov.redis is not None


def test_a_groups_chat_template_reaches_its_pods_and_the_router(helm) -> None:
    objs = render(helm, ci("k8s"))
    dep = workers(objs)[0]
    args = container(dep)["args"]
    assert args[args.index("--chat-template") + 1] == "/etc/vllm/chat-template/template.jinja"
    assert json.loads(args[args.index("--default-chat-template-kwargs") + 1]) == {"enable_thinking": False}
    (cm,) = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"].endswith("-chat-template")]
    volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "chat-template")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert {"name": "chat-template", "mountPath": "/etc/vllm/chat-template", "readOnly": True} in container(
        dep)["volumeMounts"]
    cfg = router_config(objs)
    # the model and its adapters render with the pods' template and kwargs
    for name in ("llama-8b", "llama-8b-sql", "llama-8b-support"):
        entry = model_named(cfg, name)
        assert entry.chat_template == cm["data"]["template.jinja"]
        assert entry.chat_template_kwargs == {"enable_thinking": False}
    assert not [o for o in by_kind(render(helm), "ConfigMap") if o["metadata"]["name"].endswith("-chat-template")]
