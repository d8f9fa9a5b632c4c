"""Policies as pure functions: workers and a context in, a choice out."""

import random
from collections import Counter

import pytest

from kvroute.router.errors import ConfigError
from kvroute.router.index import PrefixIndex
from kvroute.router.policies.base import PolicyDeps, RequestContext
from kvroute.router.policies.registry import POLICIES, create_policy
from kvroute.router.prefix import chain_keys
from kvroute.router.upstream.workers import Worker


def workers(n: int) -> list[Worker]:
    return [Worker(url=f"http://w{i}:8000", model="m") for i in range(n)]


def ctx(tokens: list[int], block_size: int = 16, max_tokens: int = 16) -> RequestContext:
    return RequestContext(model="m", block_keys=tuple(chain_keys(tokens, block_size)),
                          block_size=block_size, prompt_tokens=len(tokens), max_tokens=max_tokens)


def make(name: str, options=None, seed: int = 0):
    return create_policy(name, PolicyDeps(index=PrefixIndex(10_000), rng=random.Random(seed)), options)


def test_registry_has_one_name_per_policy_and_rejects_unknown():
    assert set(POLICIES) == {"round_robin", "least_loaded", "consistent_hash", "prefix"}
    with pytest.raises(ConfigError, match="valid: round_robin"):
        make("cache_aware")


def test_round_robin_cycles_through_workers():
    p, ws = make("round_robin"), workers(3)
    picks = [p.select(ws, ctx([1] * 32)).url for _ in range(6)]
    assert picks[:3] == sorted(w.url for w in ws) and picks[3:] == picks[:3]


def test_least_loaded_picks_fewest_in_flight_tokens():
    p, ws = make("least_loaded"), workers(3)
    ws[0].in_flight_tokens, ws[1].in_flight_tokens, ws[2].in_flight_tokens = 500, 20, 300
    assert p.select(ws, ctx([1] * 32)) is ws[1]


def test_least_loaded_breaks_ties_at_random():
    p, ws = make("least_loaded"), workers(4)
    assert len({p.select(ws, ctx([1] * 32)).url for _ in range(50)}) > 1


def test_consistent_hash_is_stable_and_agrees_across_replicas():
    a, b, ws = make("consistent_hash", seed=1), make("consistent_hash", seed=2), workers(5)
    for n in range(20):
        c = ctx([n] * 64)
        assert a.select(ws, c) is a.select(ws, c)
        assert a.select(ws, c).url == b.select(list(reversed(ws)), c).url


def test_consistent_hash_spills_when_owner_is_over_the_load_bound():
    p, ws = make("consistent_hash"), workers(4)
    c = ctx([42] * 64)
    owner = p.select(ws, c)
    owner.in_flight_requests = 10
    assert p.select(ws, c) is not owner


def test_consistent_hash_moves_few_keys_when_a_worker_leaves():
    p, ws = make("consistent_hash"), workers(8)
    before = {n: p.select(ws, ctx([n] * 16)).url for n in range(400)}
    after = {n: p.select(ws[:-1], ctx([n] * 16)).url for n in range(400)}
    moved = sum(before[n] != after[n] for n in before)
    assert moved == sum(1 for n in before if before[n] == ws[-1].url)


def test_prefix_sends_a_request_to_the_worker_holding_its_prefix():
    p, ws = make("prefix"), workers(4)
    system = list(range(1000, 1512))
    first = p.select(ws, ctx(system + [1] * 20))
    p.on_dispatch(first, ctx(system + [1] * 20))
    for q in range(2, 10):
        assert p.select(ws, ctx(system + [q] * 20)) is first


def test_prefix_miss_uses_bounded_load_consistent_hashing_like_consistent_hash():
    p, ch, ws = make("prefix"), make("consistent_hash"), workers(6)
    for n in range(30):
        c = ctx([n] * 64)
        assert p.select(ws, c).url == ch.select(ws, c).url


def test_prefix_weighs_cached_tokens_against_load():
    p, ws = make("prefix"), workers(2)
    long_prompt = list(range(2000))
    c = ctx(long_prompt)
    p.on_dispatch(ws[0], c)
    ws[0].in_flight_tokens = 300  # busy, but recomputing 2000 tokens elsewhere costs more
    assert p.select(ws, c) is ws[0]
    ws[0].in_flight_tokens = 30_000  # now the wait (weighted 0.1) outweighs the cache
    assert p.select(ws, c) is ws[1]


def test_prefix_spreads_a_hot_prefix_when_its_holder_is_overloaded():
    p, ws = make("prefix"), workers(4)
    hot = ctx(list(range(512)))
    holder = p.select(ws, hot)
    p.on_dispatch(holder, hot)
    holder.in_flight_requests = 12
    other = p.select(ws, hot)
    assert other is not holder
    p.on_dispatch(other, hot)  # the prefix now lives on a second worker too
    assert p.deps.index.match(hot.block_keys, [holder.url, other.url]) == {holder.url: 32, other.url: 32}


def test_prefix_counts_other_replicas_queue_from_vllm_metrics():
    p, ws = make("prefix"), workers(2)
    c = ctx(list(range(256)))
    for w in ws:
        p.on_dispatch(w, c)
    ws[0].vllm_waiting = 20  # another router replica has filled worker 0
    assert p.select(ws, c) is ws[1]


def test_prefix_breaks_ties_at_random():
    p, ws = make("prefix", seed=3), workers(3)
    c = ctx(list(range(64)))
    for w in ws:
        p.on_dispatch(w, c)
    assert len({p.select(ws, c).url for _ in range(60)}) == 3


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_returns_none_without_workers(name):
    assert make(name).select([], ctx([1] * 16)) is None


@pytest.mark.parametrize("options, key", [
    ({"nope": 1}, "x.nope"),
    ({"load_weight": -1}, "x.load_weight"),
    ({"balance_factor": 0.5}, "x.balance_factor"),
    ({"load_weight": "high"}, "x.load_weight"),
])
def test_prefix_options_are_validated_with_the_key_named(options, key):
    with pytest.raises(ConfigError) as err:
        POLICIES["prefix"].validate_options(options, "x")
    assert err.value.key == key


def test_prefix_spreads_new_prefixes_evenly_over_the_fleets_caches():
    p, ws = make("prefix"), workers(2)
    for g in range(8):
        c = ctx([g] * 320)  # 20 blocks each, no load: only cache occupancy differs
        p.on_dispatch(p.select(ws, c), c)
    assert [p.deps.index.blocks_of(w.url) for w in ws] == [80, 80]


def test_prefix_avoids_workers_whose_kv_cache_is_saturated():
    p, ws = make("prefix", {"hot_window": 8}), workers(3)
    hot = ctx(list(range(512)))
    holder = p.select(ws, hot)
    p.on_dispatch(holder, hot)
    holder.kv_usage = 0.99  # running requests fill its cache
    history = ctx(list(range(9000, 9512)))
    p.deps.index.insert(holder.url, history.block_keys)
    assert p.select(ws, history) is holder  # a history waits there: elsewhere it is recomputed
    for _ in range(3):
        p.on_dispatch(holder, hot)
    assert p.select(ws, hot) is not holder  # a hot prefix is copied to an unsaturated worker
    assert p.select(ws, ctx(list(range(9000, 9200)) + [7] * 312)) is holder  # a third cached
    assert p.select(ws, ctx(list(range(9000, 9096)) + [7] * 416)) is not holder  # a fifth
    fresh = ctx(list(range(5000, 5512)))
    for w in ws:
        w.kv_usage = 0.97 if w is not ws[2] else 0.1
    assert p.select(ws, fresh) is ws[2]  # a new prefix goes where it evicts nothing hot


def test_prefix_copies_a_hot_prefix_in_proportion_to_its_traffic():
    p, ws = make("prefix", {"hot_window": 40}), workers(4)
    hot = ctx(list(range(512)))
    picks: Counter[str] = Counter()
    for n in range(200):  # 60% of the traffic on one prefix, 40% on eight cold ones
        c = hot if n % 5 < 3 else ctx([1000 + n % 8] * 512)
        w = p.select(ws, c)
        p.on_dispatch(w, c)
        if n >= 100:
            picks[w.url] += 1
    holders = p.deps.index.match(hot.block_keys, [w.url for w in ws])
    assert sum(1 for m in holders.values() if m) == 4  # ceil(1.5 x 0.6 x 4 workers)
    assert max(picks.values()) <= 1.3 * 100 / 4  # the busiest worker stays near its fair share


def test_prefix_spreads_a_hot_prefix_from_the_start_not_after_a_full_window():
    p, ws = make("prefix"), workers(4)  # hot_window 64
    hot = ctx(list(range(512)))
    picks = Counter()
    for n in range(20):  # the first 20 requests, 60% on one prefix
        c = hot if n % 5 < 3 else ctx([2000 + n] * 512)
        w = p.select(ws, c)
        p.on_dispatch(w, c)
        if c is hot:
            picks[w.url] += 1
    assert max(picks.values()) <= 6 and len(picks) >= 3  # not all 12 on its first holder


def test_prefix_keeps_an_agent_on_its_history_when_its_shared_schema_is_hot():
    p, ws = make("prefix", {"hot_window": 20}), workers(4)
    schema = list(range(1024))
    agents = [ctx(schema + [5000 + a] * 64) for a in range(20)]
    homes = {}
    for a, c in enumerate(agents):  # every request starts with the same hot schema
        homes[a] = p.select(ws, c)
        p.on_dispatch(homes[a], c)
    assert len({w.url for w in homes.values()}) > 1  # the hot schema was copied
    for a in range(len(agents)):  # each agent's next step goes where its history is
        assert p.select(ws, ctx(schema + [5000 + a] * 64 + [7] * 32)) is homes[a]


def test_prefix_spreads_a_hot_prompt_whose_holders_differ_by_one_block():
    # the same question again behind a hot system prompt: its last holder has one block
    # more of it than the other holders, which is not a history worth pinning it to
    p, ws = make("prefix", {"hot_window": 20}), workers(4)
    schema = list(range(1024))
    again = ctx(schema + [6000] * 16)
    served: Counter[str] = Counter()
    for n in range(40):
        c = again if n % 2 else ctx(schema + [7000 + n] * 16)
        w = p.select(ws, c)
        p.on_dispatch(w, c)
        if n % 2:
            served[w.url] += 1
    assert len(served) > 1 and max(served.values()) < 20


def test_prefix_keeps_a_chat_session_on_its_holder_while_others_are_idle():
    p, ws = make("prefix"), workers(4)
    session = ctx(list(range(1024)))
    holder = p.select(ws, session)
    p.on_dispatch(holder, session)
    holder.in_flight_requests, holder.in_flight_tokens = 4, 4000
    assert p.select(ws, session) is holder  # recomputing 1024 tokens costs more than waiting


def test_prefix_sees_every_holder_in_a_fleet_larger_than_its_sample():
    p, ws = make("prefix", {"sample": 4}), workers(64)
    for n in range(32):
        c = ctx([n] * 256)
        holder = ws[(n * 7) % 64]
        p.on_dispatch(holder, c)
        assert p.select(ws, c) is holder
    new = p.select(ws, ctx([999] * 256))  # a miss still follows the ring over all workers
    assert new is make("prefix", {"sample": 4}).select(ws, ctx([999] * 256))


def test_prefix_places_new_prefixes_by_recent_traffic_not_by_old_cached_blocks():
    p, ws = make("prefix"), workers(2)
    p.deps.index.insert(ws[0].url, list(range(10**6, 10**6 + 300)))  # a warm, full cache
    placed = Counter()
    for g in range(8):
        c = ctx([g] * 320)
        w = p.select(ws, c)
        p.on_dispatch(w, c)
        placed[w.url] += 1
    assert sorted(placed.values()) == [4, 4]


def test_prefix_places_a_forgotten_prefix_back_where_it_was_recently_served():
    p, ws = make("prefix", {"occupancy_window": 64}), workers(2)
    big = ctx(list(range(4000, 4000 + 640)))  # 40 blocks
    home = p.select(ws, big)
    p.on_dispatch(home, big)
    p.deps.index.retain_workers([])  # the index forgot it (evicted), the recent traffic did not
    # its own blocks put its worker above the mean; they must not push it elsewhere
    assert p.select(ws, big) is home


def test_prefix_balances_new_chats_by_count_while_their_lengths_differ():
    p, ws = make("prefix"), workers(2)
    old, young = ws
    long_chat = ctx(list(range(480)))  # 30 blocks: a chat many turns in
    p.on_dispatch(old, long_chat)
    for s in range(3):  # three chats one turn in, 5 blocks each
        c = ctx([10_000 + s] * 80)
        p.on_dispatch(young, c)
    # fewer blocks on `young` (15 against 30), but three chats to one: the new chat goes
    # to `old`, whose blocks are within 1.5x the mean
    assert p.select(ws, ctx([20_000] * 80)) is old
    flat = make("prefix", {"cache_balance_factor": 1.0, "prefix_balance_factor": 100})
    for w, c in [(old, long_chat)] + [(young, ctx([10_000 + s] * 80)) for s in range(3)]:
        flat.on_dispatch(w, c)
    assert flat.select(ws, ctx([20_000] * 80)) is young  # by blocks alone


def test_prefix_keeps_placement_balanced_while_every_cache_is_near_full():
    p, ws = make("prefix"), workers(2)
    busy, light = ws
    for g in range(3):
        c = ctx([300 + g] * 64)
        p.on_dispatch(busy, c)
    p.on_dispatch(light, ctx([400] * 64))
    for w in ws:
        w.kv_usage = 0.92  # near full of running requests on both: no worker passes that test
    for g in range(6):  # whichever worker the ring names first
        assert p.select(ws, ctx([500 + g] * 64)) is light


def test_prefix_places_a_long_new_prefix_for_balance_even_on_a_busy_worker():
    p, ws = make("prefix"), workers(4)
    for g in range(15):  # 4 / 4 / 4 / 3 groups of 20 blocks
        p.on_dispatch(ws[g % 4] if g < 12 else ws[g - 12], ctx([100 + g] * 320))
    ws[3].in_flight_requests = 6  # the worker with 3 is over the queue bound for now
    assert p.select(ws, ctx([999] * 320)) is ws[3]  # a long prefix stays: balance first
    assert p.select(ws, ctx([997] * 304)) is ws[3]  # one a block shorter than the mean too
    assert p.select(ws, ctx([998] * 32)) is not ws[3]  # a young chat can move later: the queue


def test_prefix_does_not_count_prompts_too_short_to_cache_as_a_workers_prefixes():
    p, ws = make("prefix"), workers(4)
    short = ctx([1] * 8)  # under one block, no session: e.g. a benchmark's warm-up request
    p.on_dispatch(ws[0], short)
    placed = Counter()
    for g in range(8):
        c = ctx([200 + g] * 64)
        w = p.select(ws, c)
        p.on_dispatch(w, c)
        placed[w.url] += 1
    assert sorted(placed.values()) == [2, 2, 2, 2]  # counting it gave [1, 2, 2, 3]


def test_working_set_counts_each_recent_prefix_once_at_its_latest_length():
    from kvroute.router.policies.prefix import WorkingSet

    ws = WorkingSet(window=3)
    ws.add("a", 1, 10)
    ws.add("a", 1, 12)  # the same prefix, grown (a chat's next turn)
    ws.add("b", 2, 5)
    assert (ws.of("a"), ws.of("b"), ws.total) == (12, 5, 17)
    assert ws.of("a", excluding=1) == 0
    assert (ws.prefixes_of("a"), ws.prefixes_of("a", excluding=1), ws.prefixes) == (1, 0, 2)
    ws.add("b", 3, 7)  # pushes out a's first request; a's second keeps it
    assert (ws.of("a"), ws.of("b")) == (12, 12)
    ws.add("b", 3, 7)  # pushes out a's last request
    assert (ws.of("a"), ws.total, ws.prefixes_of("a"), ws.prefixes_of("b")) == (0, 12, 0, 2)
    ws.retain({"a"})
    assert (ws.of("b"), ws.total, ws.prefixes_of("b"), ws.prefixes) == (0, 0, 0, 0)
