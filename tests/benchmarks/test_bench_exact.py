"""Exact mode and replicas in real-fleet benchmarks; replica agreement bookkeeping."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from kvroute.benchmarks.agreement import MISS, TIE, UNIQUE, Decision, ReplicaView, classify, summarize, to_markdown
from kvroute.benchmarks.backends.routers import parse_router, router_command
from kvroute.benchmarks.backends.urls import replica_ports, target_for, urls_kv_events
from kvroute.benchmarks.workloads import TraceRecord
from kvroute.router.config import KvEventsConfig, load_config
from kvroute.router.kv_events import WorkerEvents
from kvroute.router.policies.base import RequestContext
from kvroute.router.prefix import chain_keys

WORKERS = ["http://127.0.0.1:8260", "http://127.0.0.1:8261"]
KV = {"port_offset": 10000, "replay_port_offset": 11000}


def test_parse_router_events_and_replicas() -> None:
    spec = parse_router("prefix?kv_events=1&replicas=2&load_weight=0.5")
    assert spec.kind == "kvroute" and spec.policy == "prefix"
    assert spec.kv_events and spec.replicas == 2
    assert spec.policy_options == {"load_weight": 0.5}
    assert spec.model_options == {}
    plain = parse_router("prefix")
    assert not plain.kv_events and plain.replicas == 1


def test_router_config_has_kv_events(tmp_path) -> None:
    spec = parse_router("prefix?kv_events=1")
    cmd = router_command(spec, 8290, WORKERS, "tiny", str(tmp_path), 32, tmp_path, kv_events=KV)
    path = cmd[cmd.index("--config") + 1]
    raw = json.loads(Path(path).read_text())
    model = raw["models"][0]
    assert model["kv_events"] == KV
    assert model["policy_options"] == {}
    cfg = load_config(path)  # kvroute itself accepts the file
    kv = cfg.models[0].kv_events
    assert kv is not None and kv.port_offset == 10000 and kv.replay_port_offset == 11000


def test_router_config_without_fleet_events_fails(tmp_path) -> None:
    spec = parse_router("prefix?kv_events=1")
    with pytest.raises(ValueError, match="KV events"):
        router_command(spec, 8290, WORKERS, "tiny", str(tmp_path), 32, tmp_path)
    with pytest.raises(ValueError, match="tokenizer"):
        router_command(spec, 8290, WORKERS, "tiny", None, 32, tmp_path, kv_events=KV)


def test_speculative_prefix_config_has_no_kv_events(tmp_path) -> None:
    cmd = router_command(parse_router("prefix?replicas=2"), 8291, WORKERS, "tiny", None, 32, tmp_path, kv_events=KV)
    raw = json.loads(Path(cmd[cmd.index("--config") + 1]).read_text())
    assert "kv_events" not in raw["models"][0]


def test_replica_ports_and_alternating_target() -> None:
    spec = parse_router("prefix?replicas=2")
    assert replica_ports(8290, 1, 3, spec) == [8291, 8294]
    assert replica_ports(8290, 1, 3, parse_router("smg:cache_aware")) == [8291]
    target = target_for("kvroute", WORKERS, ["http://a", "http://b"])
    rec = TraceRecord(0.0, "g", {})
    assert [target(rec) for _ in range(4)] == ["http://a", "http://b", "http://a", "http://b"]
    assert target_for("kvroute", WORKERS, "http://a")(rec) == "http://a"


def test_urls_kv_events() -> None:
    assert urls_kv_events(None) is None
    assert urls_kv_events(10000) == KV


def test_classify() -> None:
    assert classify({"a": 0, "b": 0}, 100, 32) == (MISS, 0)
    assert classify({"a": 2, "b": 1}, 100, 32) == (UNIQUE, 1)
    assert classify({"a": 2, "b": 2, "c": 0}, 100, 32) == (TIE, 2)
    assert classify({"a": 4, "b": 3}, 96, 32) == (TIE, 2)  # both cover the whole prompt


def _d(a, b, ka=UNIQUE, kb=UNIQUE, router=None) -> Decision:
    return Decision(a, b, ka, kb, 1, 1, ka == kb, 3, router)


def test_summarize_and_markdown() -> None:
    ds = [
        _d("w1", "w1", router="w1"),
        _d("w1", "w2", router="w2"),
        _d("w1", "w1", TIE, TIE),
        _d("w2", "w1", TIE, UNIQUE),
        _d("w3", "w3", MISS, MISS),
    ]
    s = summarize(ds)
    assert s["requests"] == 5 and s["agree"] == 3 and s["agreement"] == 0.6
    assert s["random_ties"] == 2 and s["ties"]["agree"] == 1
    assert s["without_ties"] == {"requests": 3, "agree": 2, "agreement": 0.6667}
    assert s["by_kind"][MISS]["agree"] == 1 and s["by_kind"][TIE]["requests"] == 1
    assert s["kinds_differ"] == 1
    assert s["router_known"] == 2 and s["router_equals_view_a"] == 1
    md = to_markdown({"command": "x", "router": "prefix?kv_events=1", "hit_rate": 0.5}, s)
    assert "| all | 5 | 3 | 60.0% |" in md


def test_replica_views_agree_on_the_same_events() -> None:
    """Two views fed the same events choose alike, except where a tie is broken at random."""

    async def go() -> None:
        views = [ReplicaView(WORKERS, KvEventsConfig(**KV), 1000, seed, "tiny") for seed in (1, 2)]
        try:
            rng = random.Random(0)
            prompts = [[rng.randrange(2000) for _ in range(96)] for _ in range(3)]
            for view in views:
                for w, ids in ((WORKERS[0], prompts[0]), (WORKERS[1], prompts[1]), (WORKERS[1], prompts[2])):
                    keys = chain_keys(ids, 32)
                    WorkerEvents(w, view.index).apply_event(
                        {"type": "BlockStored", "block_hashes": [k % 997 + 1 for k in keys],
                         "token_ids": ids, "block_size": 32, "parent_block_hash": None})
            for ids, want in ((prompts[0], WORKERS[0]), (prompts[1], WORKERS[1])):
                ctx = RequestContext("tiny", tuple(chain_keys(ids + [5] * 20, 32)), 32, len(ids) + 20, 16)
                (a, ka, _, ma), (b, kb, _, mb) = (v.decide(ctx) for v in views)
                assert a == b == want and ka == kb == UNIQUE and ma == mb
            fresh = [rng.randrange(2000) for _ in range(64)]
            ctx = RequestContext("tiny", tuple(chain_keys(fresh, 32)), 32, 64, 16)
            (a, ka, _, _), (b, kb, _, _) = (v.decide(ctx) for v in views)
            assert ka == kb == MISS and a == b  # ring placement: the same on every replica
        finally:
            for v in views:
                await v.close()

    asyncio.run(go())


def test_parse_router_state() -> None:
    from kvroute.benchmarks.backends.urls import parse_router_state

    health = {"status": "ok", "models": {"tiny": {"mode": "kv_events", "healthy_workers": 4}}}
    metrics = (
        "# HELP kvroute_kv_events_total vLLM KV events received, by type\n"
        "# TYPE kvroute_kv_events_total counter\n"
        'kvroute_kv_events_total{worker="w1",type="BlockStored"} 10.0\n'
        'kvroute_kv_events_total{worker="w2",type="BlockStored"} 5.0\n'
        'kvroute_kv_events_total{worker="w1",type="BlockRemoved"} 3.0\n'
        "# HELP kvroute_kv_event_gaps_total Gaps\n"
        "# TYPE kvroute_kv_event_gaps_total counter\n"
        'kvroute_kv_event_gaps_total{worker="w1"} 1.0\n'
        "# TYPE kvroute_worker_predicted_cached_tokens counter\n"
        'kvroute_worker_predicted_cached_tokens_total{model="tiny",worker="w1"} 640.0\n'
        'kvroute_worker_predicted_cached_tokens_total{model="tiny",worker="w2"} 64.0\n'
        "# TYPE kvroute_worker_cached_prompt_tokens counter\n"
        'kvroute_worker_cached_prompt_tokens_total{model="tiny",worker="w1"} 608.0\n'
    )
    state = parse_router_state(health, metrics)
    assert state == {"mode": "kv_events", "kv_events": {"BlockRemoved": 3, "BlockStored": 15}, "gaps": 1,
                     "predicted_cached_tokens": 704, "cached_tokens": 608, "added_ms_p50": None}
