"""The router pod's part in a graceful drain: probes on /livez and /readyz, a preStop sleep
so the pod leaves the Service first, and a termination grace period that covers
``server.drain_s`` (docs/reliability.md)."""

from __future__ import annotations

import pytest

from tests.helm.chart import CHART, RELEASE, ci, container, docs, one, raw_router_config, render, run_helm


def router_pod(objs: list[dict]) -> dict:
    return one(objs, "Deployment", "router")["spec"]["template"]["spec"]


def test_defaults_drain_30s_behind_a_5s_pre_stop_sleep(helm) -> None:
    objs = render(helm)
    pod = router_pod(objs)
    c = container(one(objs, "Deployment", "router"))
    assert raw_router_config(objs)["server"]["drain_s"] == 30
    assert c["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
    assert pod["terminationGracePeriodSeconds"] == 5 + 30 + 15
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"


@pytest.mark.parametrize("set_json, grace", [
    ("router.config.server.drain_s=120", 5 + 120 + 15),
    ("router.config.server.drain_s=1.5", 5 + 2 + 15),  # whole seconds, rounded up
    ("router.preStopSleepSeconds=0", 30 + 15),
    ("router.terminationGracePeriodSeconds=300", 300),  # an explicit value wins when it covers the drain
])
def test_the_grace_period_follows_drain_s(helm, set_json, grace) -> None:
    objs = docs(run_helm(helm, "template", RELEASE, str(CHART), "--set-json", set_json).stdout)
    assert router_pod(objs)["terminationGracePeriodSeconds"] == grace


def test_no_pre_stop_hook_when_the_sleep_is_zero(helm) -> None:
    objs = render(helm, None, "router.preStopSleepSeconds=0")
    assert "lifecycle" not in container(one(objs, "Deployment", "router"))


def test_a_grace_period_shorter_than_the_drain_is_refused(helm) -> None:
    proc = run_helm(helm, "template", RELEASE, str(CHART), "-f", str(ci("production")),
                    "--set", "router.terminationGracePeriodSeconds=20", check=False)
    assert proc.returncode != 0
    assert "SIGKILL the router mid-drain" in proc.stderr, proc.stderr


@pytest.mark.parametrize("bad, where", [
    ("router.preStopSleepSeconds=-1", "/router/preStopSleepSeconds"),
    ("router.config.server.overload=drop", "/router/config/server/overload"),
    ("router.config.server.max_in_flight=0", "/router/config/server/max_in_flight"),
])
def test_schema_rejects_bad_drain_and_admission_values(helm, bad, where) -> None:
    proc = run_helm(helm, "template", RELEASE, str(CHART), "--set", bad, check=False)
    assert proc.returncode != 0 and where in proc.stderr, proc.stderr
