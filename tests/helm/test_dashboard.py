"""The Grafana dashboard (helm/kvroute/dashboards/kvroute.json) queries only metrics the
router really exports, with labels they really have.

The exported set is built from the router's own code: ``RouterMetrics`` registered in a
fresh ``CollectorRegistry`` (the governor, cascade and alerts record into that same object,
so it holds the governance metrics too). vLLM's ``vllm:*`` metrics come from the workers,
not the router; they are checked against the names the router's scraper and the docs use.
"""

from __future__ import annotations

import json
import re

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from kvroute.router.metrics import RouterMetrics
from tests.helm.chart import CHART

DASHBOARD = json.loads((CHART / "dashboards" / "kvroute.json").read_text())
# vLLM metric names the router's scraper (router/upstream/scraper.py) and the README use.
VLLM_METRICS = {
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total", "vllm:prompt_tokens_cached_total", "vllm:generation_tokens_total",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:cache_config_info",
}
# Labels Prometheus adds to every scraped series (the ServiceMonitor/PodMonitor target).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}
KEYWORDS = {"and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
TOKEN = re.compile(
    r"(?P<number>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
    r"|(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)\s*(?P<matchers>\{[^}]*\})?(?P<call>\s*\()?"
    r"|(?P<bare>\{[^}]*\})")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


def exported() -> dict[str, set[str]]:
    """Every sample name the router exposes on /metrics -> its label names."""
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    out: dict[str, set[str]] = {}
    collectors = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    # process_* and python_*: prometheus-client's own collectors, which the dashboard may read too
    families = {f.name: f.type for f in registry.collect()}
    ours = {name for name in families if not name.startswith(("process_", "python_"))}
    assert {c._name for c in collectors} == ours, "RouterMetrics registers something else too"
    for c in collectors:
        labels = set(c._labelnames)
        kind = families[c._name]
        if kind == "counter":
            out[f"{c._name}_total"] = labels
        elif kind == "histogram":
            out[f"{c._name}_bucket"] = labels | {"le"}
            out[f"{c._name}_sum"] = out[f"{c._name}_count"] = labels
        else:
            out[c._name] = labels
    for family in registry.collect():
        if family.name not in ours:
            out.update({s.name: set(s.labels) for s in family.samples})
    return out


def parse(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """(metric selectors as (name, matcher labels), grouping labels) of a PromQL expr."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals ($model etc.)
    s = re.sub(r"\[[^\]]*\]", "", s)  # range selectors ([$__rate_interval], [5m:1m])
    grouping = {label.strip() for _, labels in GROUPING.findall(s) for label in labels.split(",") if label.strip()}
    s = GROUPING.sub(" ", s)
    selectors = []
    for m in TOKEN.finditer(s):
        if m.group("bare"):
            raise AssertionError(f"selector without a metric name in {expr!r}")
        name = m.group("name")
        if not name or m.group("call") or name.lower() in KEYWORDS:
            continue  # a number, a function or aggregation, or a keyword
        selectors.append((name, set(MATCHER.findall(m.group("matchers") or ""))))
    return selectors, grouping


def exprs() -> list[tuple[str, str]]:
    out = []
    for panel in DASHBOARD["panels"]:
        for target in panel.get("targets", ()):
            out.append((panel["title"], target["expr"]))
    for var in DASHBOARD["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
            assert found, query
            out.append((f"${var['name']}", f"sum by ({found.group(2)}) ({found.group(1)})"))
    return out


EXPORTED = exported()
EXPRS = exprs()


def test_parser_finds_metrics_not_functions() -> None:
    selectors, grouping = parse(
        'histogram_quantile(0.95, sum by (le, model) (rate(kvroute_ttft_seconds_bucket{model=~"$m"}'
        '[$__rate_interval]))) / ignoring (tier) group_left sum(rate(x_total{a="1",b!~"2..|ok"}[5m])) * 1e-9')
    assert selectors == [("kvroute_ttft_seconds_bucket", {"model"}), ("x_total", {"a", "b"})]
    assert grouping == {"le", "model", "tier"}


def test_exported_set_is_the_router_registry() -> None:
    for name in ("kvroute_spend_usd_total", "kvroute_spend_tokens_total", "kvroute_budget_used_ratio",
                 "kvroute_alerts_total", "kvroute_tier_requests_total", "kvroute_cascade_escalations_total",
                 "kvroute_ttft_seconds_bucket", "kvroute_worker_in_flight_requests"):
        assert name in EXPORTED, name
    assert "kvroute_ttft_seconds_total" not in EXPORTED and "kvroute_spend_usd_bucket" not in EXPORTED


@pytest.mark.parametrize("title, expr", EXPRS, ids=[f"{t}#{i}" for i, (t, _) in enumerate(EXPRS)])
def test_every_query_uses_exported_metrics_and_labels(title, expr) -> None:
    selectors, grouping = parse(expr)
    assert selectors, f"{title}: no metric in {expr!r}"
    labels: set[str] = set(TARGET_LABELS)
    for name, matched in selectors:
        if name.startswith("vllm:"):
            assert name in VLLM_METRICS, f"{title}: {name} is not a vLLM metric the router knows"
            continue
        assert name in EXPORTED, f"{title}: the router does not export {name}"
        assert matched <= EXPORTED[name], f"{title}: {name} has no label {sorted(matched - EXPORTED[name])}"
        labels |= EXPORTED[name]
    if all(not n.startswith("vllm:") for n, _ in selectors):
        assert grouping <= labels, f"{title}: grouped by {sorted(grouping - labels)}, which no metric has"


def test_dashboard_covers_governance_tiers_and_cascade() -> None:
    panels = {p["title"]: " ".join(t["expr"] for t in p.get("targets", ())) for p in DASHBOARD["panels"]}

    def panel(metric: str, by: str | None = None) -> bool:
        return any(metric in e and (by is None or re.search(rf"by \(([^)]*\b{by}\b[^)]*)\)", e))
                   for e in panels.values())

    for by in ("tenant", "agent", "model"):
        assert panel("kvroute_spend_usd_total", by), f"no spend-by-{by} panel"
    assert panel("kvroute_budget_used_ratio")
    assert panel("kvroute_alerts_total", "kind")
    assert panel("kvroute_tier_requests_total", "tier")
    assert panel("kvroute_cascade_escalations_total")
    budget = next(p for p in DASHBOARD["panels"] if "kvroute_budget_used_ratio" in json.dumps(p.get("targets")))
    steps = budget["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps][-1] == 1, "the budget panel marks the limit"


def test_panel_ids_and_layout() -> None:
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for p in DASHBOARD["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
