"""Workloads: determinism, group structure, freshness per nonce, JSONL round trip."""

from __future__ import annotations

import argparse
import collections
import dataclasses

import pytest

from kvroute.benchmarks.workloads import (
    WorkloadSpec,
    add_workload_args,
    iter_records,
    read_trace,
    workload_from_args,
    write_trace,
)


def _lines(spec: WorkloadSpec) -> list[str]:
    return [r.to_json() for r in iter_records(spec)]


@pytest.mark.parametrize("name", ["shared-prefix", "multi-turn", "agent", "hot-prefix"])
def test_same_spec_same_records(name: str) -> None:
    spec = WorkloadSpec(name=name, requests=40, groups=4, prefix_tokens=200, seed=3)
    assert _lines(spec) == _lines(spec)
    assert _lines(spec) != _lines(
        WorkloadSpec(name=name, requests=40, groups=4, prefix_tokens=200, seed=4)
    )


def test_shared_prefix_groups() -> None:
    spec = WorkloadSpec(requests=16 * 12, groups=16, prefix_tokens=300)
    recs = list(iter_records(spec))
    per_group = collections.Counter(r.group for r in recs)
    assert len(per_group) == 16 and set(per_group.values()) == {12}
    systems = collections.defaultdict(set)
    for r in recs:
        systems[r.group].add(r.body["messages"][0]["content"])
    assert all(len(s) == 1 for s in systems.values())  # one system prompt per group
    assert len({next(iter(s)) for s in systems.values()}) == 16  # distinct across groups
    assert len({r.body["messages"][1]["content"] for r in recs}) == len(recs)  # fresh questions
    assert [r.group for r in recs[:16]] != [f"g{i}" for i in range(16)]  # interleaved at random


def test_nonce_freshens_prefixes_but_keeps_structure() -> None:
    a = list(iter_records(WorkloadSpec(requests=48, groups=4, prefix_tokens=200, nonce="kvroute")))
    b = list(iter_records(WorkloadSpec(requests=48, groups=4, prefix_tokens=200, nonce="smg")))
    assert [r.group for r in a] == [r.group for r in b]
    for x, y in zip(a, b):
        sx, sy = x.body["messages"][0]["content"], y.body["messages"][0]["content"]
        assert sx != sy and sx[0] == sy[0] == "[" and len(sx) == len(sy)
        assert sx.split("] ", 1)[1] == sy.split("] ", 1)[1]


def test_hot_prefix_share() -> None:
    recs = list(
        iter_records(
            WorkloadSpec(
                name="hot-prefix", requests=2000, groups=8, hot_share=0.7, prefix_tokens=50
            )
        )
    )
    share = sum(r.group == "g0" for r in recs) / len(recs)
    assert 0.65 < share < 0.75


def test_multi_turn_history_grows() -> None:
    recs = list(iter_records(WorkloadSpec(name="multi-turn", requests=24, groups=3, turns=4)))
    by_session = collections.defaultdict(list)
    for r in recs:
        by_session[r.session].append(r)
    assert len(by_session) == 6
    for turns in by_session.values():
        sizes = [len(r.body["messages"]) for r in turns]
        assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
        first = turns[0].body["messages"]
        assert turns[-1].body["messages"][: len(first) - 1] == first[:-1]  # prefix is kept
    assert [r.t for r in recs] == sorted(r.t for r in recs)


def test_agents_share_schema() -> None:
    recs = list(
        iter_records(WorkloadSpec(name="agent", requests=64, groups=8, turns=4, prefix_tokens=400))
    )
    schemas = collections.defaultdict(set)
    for r in recs:
        schemas[r.group].add(r.body["messages"][0]["content"])
    assert len(schemas) == 2 and all(len(s) == 1 for s in schemas.values())
    agents_per_schema = collections.defaultdict(set)
    for r in recs:
        agents_per_schema[r.group].add(r.session)
    assert all(len(a) > 1 for a in agents_per_schema.values())
    longest = max(recs, key=lambda r: len(r.body["messages"]))
    assert any(m["content"].startswith("[tool result") for m in longest.body["messages"])


def test_jsonl_round_trip_and_trace_replay(tmp_path) -> None:
    spec = WorkloadSpec(name="multi-turn", requests=20, groups=2, turns=5, rate=3.0)
    recs = list(iter_records(spec))
    path = tmp_path / "t.jsonl"
    assert write_trace(recs, path) == 20
    assert list(read_trace(path)) == recs
    replay = list(iter_records(WorkloadSpec(name="trace", trace_path=str(path))))
    assert replay == recs
    fresh = list(iter_records(WorkloadSpec(name="trace", trace_path=str(path), nonce="x")))
    assert fresh[0].body["messages"][0]["content"].endswith(recs[0].body["messages"][0]["content"])
    assert fresh[0].body["messages"][0]["content"] != recs[0].body["messages"][0]["content"]


def test_workload_flags() -> None:
    p = argparse.ArgumentParser()
    add_workload_args(p)
    assert workload_from_args(p.parse_args([])) == WorkloadSpec()  # flag defaults are the spec's
    spec = workload_from_args(p.parse_args(["--workload", "multi-turn", "--groups", "5", "--turns", "3",
                                            "--seed", "7", "--rate", "2"]))
    assert spec == WorkloadSpec("multi-turn", seed=7, groups=5, turns=3, rate=2.0)
    with pytest.raises(SystemExit):
        p.parse_args(["--workload", "nope"])
    described = spec.with_nonce("n").describe()
    assert described == {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
                         if f.name not in ("nonce", "extra")}
    assert list(described)[:3] == ["name", "seed", "requests"]  # field order: results.json's key order


def test_unknown_workload() -> None:
    with pytest.raises(ValueError, match="valid"):
        iter_records(WorkloadSpec(name="nope"))


def test_prefix_length_in_tiny_tokens(tiny_model_dir) -> None:
    from kvroute.router.prefix import PromptTokenizer

    tok = PromptTokenizer(str(tiny_model_dir))
    rec = next(iter(iter_records(WorkloadSpec(requests=1, groups=1, prefix_tokens=1800))))
    n = len(tok.encode_text(rec.body["messages"][0]["content"]))
    assert 1750 < n < 1850, n
    n = len(tok.chat_ids(rec.body["messages"]))
    assert n + rec.body["max_tokens"] < 2048, n  # fits the tiny fleet's --max-model-len


@pytest.mark.parametrize("name", ["shared-prefix", "multi-turn", "agent"])
def test_every_nonce_gives_prompts_of_equal_length(tiny_model_dir, name: str) -> None:
    # Routers compared in one run must see the same prompt lengths, or block boundaries,
    # and with them cached-token counts, differ between routers for no routing reason.
    from kvroute.router.prefix import PromptTokenizer

    tok = PromptTokenizer(str(tiny_model_dir))
    spec = WorkloadSpec(name=name, requests=24, groups=4, prefix_tokens=300)
    lengths = {
        nonce: [len(tok.chat_ids(r.body["messages"])) for r in iter_records(spec.with_nonce(nonce))]
        for nonce in ("prefix", "smg:cache_aware", "oracle", "round_robin", "x", "")
    }
    assert len({tuple(v) for v in lengths.values()}) == 1, lengths
