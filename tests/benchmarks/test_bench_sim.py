"""The simulator: cache (LRU, hits, tail-first eviction), queueing, keys, and the real policies."""

from __future__ import annotations

from kvroute.benchmarks.backends.sim import SimConfig, simulate
from kvroute.benchmarks.backends.simkeys import KeyCache, TinyIds, WordIds
from kvroute.benchmarks.backends.simworker import SimRequest, SimWorker, Timing
from kvroute.benchmarks.workloads import WorkloadSpec, iter_records
from kvroute.router.prefix import PromptTokenizer, chain_keys

BS = 4


def _req(rid: int, keys: tuple[int, ...], max_tokens: int = 1) -> SimRequest:
    # prompt one token longer than its full blocks, so every block can hit
    return SimRequest(rid, keys, len(keys) * BS + 1, max_tokens, 0.0)


def _run(w: SimWorker, req: SimRequest) -> SimRequest:
    w.submit(req)
    now = 0.0
    while True:
        plan = w.plan_step()
        assert plan is not None
        now += plan[0]
        done, _ = w.finish_step(now, plan[1])
        if done:
            return done[0]


def test_hits_and_counters() -> None:
    w = SimWorker("w", capacity_blocks=16, block_size=BS, timing=Timing())
    _run(w, _req(0, (1, 2, 3)))
    r = _run(w, _req(1, (1, 2, 9)))
    assert r.hit_tokens == 2 * BS
    assert w.prefix_queries == 2 * (3 * BS + 1)
    assert w.prefix_hits == 2 * BS
    assert w.generation_tokens == 2 and w.requests_done == 2


def test_last_token_is_always_computed() -> None:
    w = SimWorker("w", capacity_blocks=16, block_size=BS, timing=Timing())
    exact = SimRequest(0, (1, 2), 2 * BS, 1, 0.0)  # prompt is exactly two full blocks
    _run(w, exact)
    again = _run(w, SimRequest(1, (1, 2), 2 * BS, 1, 0.0))
    assert again.hit_tokens == BS  # vLLM recomputes the last block


def test_lru_eviction_tail_first() -> None:
    # capacity 6: each request takes 3 keyed blocks + 1 private block (partial tail + decode)
    w = SimWorker("w", capacity_blocks=5, block_size=BS, timing=Timing())
    _run(w, _req(0, (1, 2, 3)))  # 3 keyed blocks + 1 private (partial tail and decode)
    _run(w, _req(1, (7, 8)))  # needs 3 blocks, 2 are free: one cached block must go
    assert w.cached_prefix((1, 2, 3)) == 2  # block 3, the tail, went first
    assert w.evictions == 1
    _run(w, _req(2, (1, 2, 5)))  # reuses 1, 2; evicts the least recently freed block, 8
    assert w.cached_prefix((7, 8)) == 1
    assert w.cached_prefix((1, 2)) == 2
    assert w.used_blocks() <= 5


def test_waits_when_kv_is_full() -> None:
    w = SimWorker("w", capacity_blocks=5, block_size=BS, timing=Timing())
    w.submit(_req(0, (1, 2, 3), max_tokens=3))
    w.submit(_req(1, (4, 5, 6), max_tokens=3))
    w.plan_step()
    assert w.num_running == 1 and w.num_waiting == 1  # the second does not fit beside the first


def test_keycache_matches_chain_keys() -> None:
    tok = WordIds()
    msgs = [
        {"role": "system", "content": "alpha beta gamma " * 30},
        {"role": "user", "content": "q one"},
    ]
    cache = KeyCache(tok, 8)
    ids = (
        tok.message_ids("system", msgs[0]["content"])
        + tok.message_ids("user", "q one")
        + tok.generation_ids()
    )
    assert cache.keys(msgs) == (tuple(chain_keys(ids, 8)), len(ids))
    longer = msgs + [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q two"}]
    keys, n = cache.keys(longer)  # extends the cached prefix of the shorter conversation
    longer_ids = [t for m in longer for t in tok.message_ids(m["role"], m["content"])] + tok.generation_ids()
    assert (keys, n) == (tuple(chain_keys(longer_ids, 8)), len(longer_ids))
    shared = chain_keys(ids[: len(ids) - len(tok.generation_ids())], 8)
    assert len(shared) > 8 and keys[: len(shared)] == tuple(shared)


def test_tiny_tokenization_equals_router_keys(tiny_model_dir) -> None:
    msgs = [
        {"role": "system", "content": "You are helpful. " * 40},
        {"role": "user", "content": "Why?"},
    ]
    keys, n = KeyCache(TinyIds(str(tiny_model_dir)), 32).keys(msgs)
    ids = PromptTokenizer(str(tiny_model_dir)).chat_ids(msgs)
    assert (keys, n) == (tuple(chain_keys(ids, 32)), len(ids))


def _sim(router: str, **kw) -> float:
    spec = WorkloadSpec(requests=96, groups=8, prefix_tokens=600, nonce=router)
    # ~22 blocks per prompt, ~3 prompts per worker: round robin thrashes, pinning does not
    cfg = SimConfig(workers=4, capacity_blocks=70, block_size=32, concurrency=4, **kw)
    run = simulate(iter_records(spec), router, cfg, KeyCache(WordIds(), 32))
    assert run.completed == 96 and sum(run.per_worker_requests) == 96
    assert run.extra["index_entries"] <= 4 * 70
    return run.hit_rate


def test_real_prefix_policy_beats_round_robin() -> None:
    rr, prefix, oracle = _sim("round_robin"), _sim("prefix"), _sim("oracle")
    assert prefix > rr + 0.2
    assert oracle >= prefix - 0.05


def test_open_loop_and_scrape() -> None:
    spec = WorkloadSpec(requests=50, groups=5, prefix_tokens=300, rate=50.0)
    cfg = SimConfig(workers=3, capacity_blocks=100, block_size=32, scrape_s=0.05)
    run = simulate(iter_records(spec), "least_loaded", cfg, KeyCache(WordIds(), 32))
    assert run.completed == 50 and len(run.ttft_s) == 50
    assert all(t > 0 for t in run.ttft_s)
    assert run.duration_s > 0.5  # arrivals spread over ~1 s


def test_exact_mode_index_follows_the_simulated_kv_events() -> None:
    spec = WorkloadSpec(requests=96, groups=8, prefix_tokens=600)
    cfg = SimConfig(workers=4, capacity_blocks=70, block_size=32, concurrency=4)
    runs = {exact: simulate(iter_records(spec.with_nonce(str(exact))), "prefix", cfg,
                            KeyCache(WordIds(), 32), exact=exact) for exact in (False, True)}
    assert runs[True].completed == 96 and runs[True].extra["evictions"] > 0
    assert runs[True].extra["index_mismatch_blocks"] == 0  # removals applied, nothing missed
    assert runs[True].hit_rate >= runs[False].hit_rate - 0.05
