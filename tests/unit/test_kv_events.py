"""Exact mode without sockets: event batches in, index state out."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest

from kvroute.router.config import KvEventsConfig, config_from_dict
from kvroute.router.errors import ConfigError
from kvroute.router.kv_events import EventHub, WorkerEvents, endpoints_for
from kvroute.router.kv_index import EventApplier, ExactIndex
from kvroute.router.prefix import chain_keys


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Counts:
    def __init__(self):
        self.events: dict[tuple[str, str], int] = {}
        self.gaps = 0

    def event(self, worker, kind, n=1):
        self.events[(worker, kind)] = self.events.get((worker, kind), 0) + n

    def gap(self, worker):
        self.gaps += 1


def stored(hashes, tokens, parent=None, block_size=4):
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
            "token_ids": tokens, "block_size": block_size, "lora_id": None, "medium": "GPU"}


def batch(*events) -> bytes:
    return msgspec.msgpack.encode([1.0, list(events)])


@pytest.fixture
def setup():
    clock, counts = Clock(), Counts()
    index = ExactIndex(capacity_blocks=1000, speculative_ttl_s=5, clock=clock)
    return index, WorkerEvents("w1", index, counts), clock, counts


def test_stored_blocks_get_our_own_chain_keys_whatever_vllms_hashes(setup):
    index, ev, _, counts = setup
    tokens = list(range(12))
    ev.apply_payload(batch(stored([111, 222], tokens[:8])))
    ev.apply_payload(batch(stored([333], tokens[8:], parent=222)))
    assert index.confirmed_blocks("w1") == set(chain_keys(tokens, 4))
    assert index.match(chain_keys(tokens, 4), ["w1"]) == {"w1": 3}
    assert counts.events[("w1", "BlockStored")] == 2


def test_removed_blocks_are_resolved_through_the_hash_map(setup):
    index, ev, _, _ = setup
    tokens = list(range(12))
    ev.apply_payload(batch(stored([1, 2, 3], tokens)))
    ev.apply_payload(batch({"type": "BlockRemoved", "block_hashes": [3], "medium": "GPU"}))
    assert index.match(chain_keys(tokens, 4), ["w1"]) == {"w1": 2}
    ev.apply_payload(batch({"type": "AllBlocksCleared"}))
    assert index.confirmed_blocks("w1") == set() and len(index) == 0


def test_speculative_entries_expire_unless_confirmed(setup):
    index, ev, clock, _ = setup
    a, b = chain_keys(list(range(8)), 4), chain_keys(list(range(100, 108)), 4)
    index.insert("w1", a)
    index.insert("w1", b)
    ev.apply_payload(batch(stored([7, 8], list(range(8)))))  # confirms a only
    clock.now += 60  # still in flight (queued on a slow worker): b is kept
    assert index.match(b, ["w1"]) == {"w1": 2}
    index.settle("w1", a)
    index.settle("w1", b)  # done, yet vLLM never reported b: it goes after the TTL
    clock.now += 6
    assert index.match(a, ["w1"]) == {"w1": 2}
    assert index.match(b, ["w1"]) == {"w1": 0}
    index.insert("w1", b)  # never settled (a lost completion): gone after in_flight_ttl_s
    clock.now += index.in_flight_ttl + 1
    assert index.match(b, ["w1"]) == {"w1": 0}


def test_unresolvable_parent_and_garbage_are_counted_and_skipped(setup):
    index, ev, _, counts = setup
    ev.apply_payload(batch(stored([5], [1, 2, 3, 4], parent=999)))  # parent before we subscribed
    ev.apply_payload(b"\xc1 not msgpack")
    ev.apply_payload(msgspec.msgpack.encode({"not": "a batch"}))
    ev.apply_payload(batch({"type": "Martian"}, {"type": "BlockStored"}, 42,
                           stored([6], [1, 2, 3])))  # 3 tokens cannot fill a block of 4
    assert counts.events[("w1", "unresolved")] == 1
    assert counts.events[("w1", "invalid")] >= 4
    assert counts.events[("w1", "unknown")] == 1
    assert len(index) == 0


def test_sequence_numbers_detect_gaps_and_restarts(setup):
    _, ev, _, _ = setup
    assert [ev.check_seq(s) for s in (105, 106, 107, 109, 110, 108, 111, 2)] == \
        ["ok", "ok", "ok", "gap", "ok", "duplicate", "ok", "restart"]
    ev.check_seq(5000)
    assert [ev.check_seq(s) for s in (4990, 3000)] == ["duplicate", "restart"]


def test_confirmed_entries_have_a_safety_cap():
    index = ExactIndex(capacity_blocks=3)
    ev = WorkerEvents("w1", index)
    ev.apply_payload(batch(stored([1, 2, 3, 4, 5], list(range(20)))))
    assert index.blocks_of("w1") == 3


def test_endpoints_from_port_offset_fixed_port_or_map():
    assert endpoints_for("http://10.0.0.5:8000", KvEventsConfig(port=5557, replay_port=5558)) == \
        ("tcp://10.0.0.5:5557", "tcp://10.0.0.5:5558")
    assert endpoints_for("http://127.0.0.1:8101", KvEventsConfig(port_offset=-2500)) == ("tcp://127.0.0.1:5601", None)
    cfg = KvEventsConfig(endpoints={"http://a:1": "tcp://b:2"})
    assert endpoints_for("http://a:1", cfg)[0] == "tcp://b:2"


def test_kv_events_config_is_validated(tiny_model_dir):
    base = {"name": "m", "workers": ["http://a:1"], "tokenizer": str(tiny_model_dir)}
    cfg = config_from_dict({"models": [{**base, "kv_events": {"port": 5557}}]})
    assert cfg.models[0].kv_events.port == 5557
    for bad, key in (({}, "models[0].kv_events"), ({"port": "x"}, "models[0].kv_events.port"),
                     ({"endpoints": {"http://a:1": "http://b"}}, "models[0].kv_events.endpoints.http://a:1")):
        with pytest.raises(ConfigError) as err:
            config_from_dict({"models": [{**base, "kv_events": bad}]})
        assert err.value.key == key
    with pytest.raises(ConfigError, match="tokenizer"):
        config_from_dict({"models": [{"name": "m", "workers": ["http://a:1"], "kv_events": {"port": 1}}]})


def test_event_benchmark_applies_every_event_and_writes_its_report(tmp_path):
    from kvroute.benchmarks import kv_events_bench

    assert kv_events_bench.main(["--events", "2000", "--out", str(tmp_path)]) == 0
    result = __import__("json").loads((tmp_path / "kv_events_bench.json").read_text())
    assert result["events"] == 2000 and result["blocks_held"] <= 256 + 16
    assert "events/s per core" in (tmp_path / "kv_events_bench.md").read_text()


def test_occupancy_counts_blocks_in_flight_once(setup):
    index, ev, _, _ = setup
    keys = chain_keys(list(range(8)), 4)
    index.insert("w1", keys)  # sent, not yet reported: it counts already
    assert index.blocks_of("w1") == 2
    ev.apply_payload(batch(stored([7, 8], list(range(8)))))
    assert index.blocks_of("w1") == 2


def test_a_settled_block_expires_even_behind_an_older_request_still_in_flight(setup):
    index, _, clock, _ = setup
    slow, quick = chain_keys(list(range(8)), 4), chain_keys(list(range(100, 108)), 4)
    index.insert("w1", slow)  # a long generation, still running
    index.insert("w1", quick)
    index.settle("w1", quick)  # done, and vLLM never reported its blocks
    clock.now += 6
    assert index.blocks_of("w1") == 2  # only the running request's blocks are counted
    assert index.match(quick, ["w1"]) == {"w1": 0} and index.match(slow, ["w1"]) == {"w1": 2}
    index.insert("w1", quick)  # sent again: in flight again, whatever was settled before
    clock.now += 6
    assert index.match(quick, ["w1"]) == {"w1": 2} and index.blocks_of("w1") == 4


def test_the_index_applies_decoded_events_without_the_transport():
    index, counts = ExactIndex(capacity_blocks=1000), Counts()
    applier = EventApplier("w1", index, counts)
    tokens = list(range(12))
    applier.apply_event(stored([1, 2], tokens[:8]))
    applier.apply_event(stored([3], tokens[8:], parent=2))
    assert index.confirmed_blocks("w1") == set(chain_keys(tokens, 4))
    applier.apply_event(["BlockRemoved", [3], "GPU"])  # vLLM's array-like form
    assert index.match(chain_keys(tokens, 4), ["w1"]) == {"w1": 2}
    applier.apply_event({"type": "AllBlocksCleared"})
    assert len(index) == 0 and not applier._ours
    assert counts.events == {("w1", "BlockStored"): 2, ("w1", "BlockRemoved"): 1, ("w1", "AllBlocksCleared"): 1}


def test_the_index_module_needs_neither_zmq_nor_msgpack():
    """The index imports no transport: sockets and decoding are router.kv_events' job."""
    code = ("import sys, kvroute.router.kv_index\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('zmq', 'msgspec')"
            " or m == 'kvroute.router.kv_events'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_worker_in_two_pools_feeds_both_indexes():
    """One server under two names (or a base model and its LoRA adapter): its events reach
    every pool's index, each of which matches its own keys."""
    base, adapter = ExactIndex(capacity_blocks=100), ExactIndex(capacity_blocks=100)
    events = WorkerEvents("w1", base)
    events.indexes.append(adapter)
    events.apply_event(stored([111, 222], list(range(8))))
    assert base.confirmed_blocks("w1") == adapter.confirmed_blocks("w1") == set(chain_keys(list(range(8)), 4))
    events.apply_event({"type": "BlockRemoved", "block_hashes": [222], "medium": "GPU"})
    assert base.confirmed_blocks("w1") == adapter.confirmed_blocks("w1") == {chain_keys(list(range(8)), 4)[0]}


async def test_a_pool_that_joins_a_worker_later_starts_from_what_it_holds():
    """A pool added later (a config reload, an adapter discovered after its base model) shares
    the worker's subscriber, and with it the blocks the worker reported before."""
    base, adapter = ExactIndex(capacity_blocks=100), ExactIndex(capacity_blocks=100)
    hub = EventHub(Counts())
    cfg = KvEventsConfig(port_offset=1000)
    url = "http://127.0.0.1:9"
    try:
        hub.sync(base, cfg, [url])
        hub._subs[url][1].apply_event(stored([111, 222], list(range(8))))
        hub.sync(adapter, cfg, [url])
        keys = chain_keys(list(range(8)), 4)
        assert adapter.confirmed_blocks(url) == base.confirmed_blocks(url) == set(keys)
        assert adapter.match(keys, [url]) == {url: 2}
        hub._subs[url][1].apply_event({"type": "BlockRemoved", "block_hashes": [222], "medium": "GPU"})
        assert adapter.confirmed_blocks(url) == {keys[0]}  # and follows the worker from there
    finally:
        await hub.close()


async def test_the_hub_subscribes_once_per_worker_and_feeds_each_pool():
    base, adapter = ExactIndex(capacity_blocks=100), ExactIndex(capacity_blocks=100)
    hub = EventHub(Counts())
    cfg = KvEventsConfig(port_offset=1000)
    try:
        hub.sync(base, cfg, ["http://127.0.0.1:9", "http://127.0.0.1:10"])
        hub.sync(adapter, cfg, ["http://127.0.0.1:9"])
        assert sorted(hub._subs) == ["http://127.0.0.1:10", "http://127.0.0.1:9"]
        assert hub._subs["http://127.0.0.1:9"][1].indexes == [base, adapter]
        hub.sync(base, cfg, [])  # the base pool lets both go: the adapter keeps its worker's events
        assert list(hub._subs) == ["http://127.0.0.1:9"] and hub._subs["http://127.0.0.1:9"][1].indexes == [adapter]
        hub.sync(adapter, cfg, [])
        assert not hub._subs
    finally:
        await hub.close()
