from kvroute.router.index import PrefixIndex
from kvroute.router.prefix import chain_keys


def test_match_counts_longest_shared_prefix_per_worker():
    idx = PrefixIndex(capacity_blocks=100)
    a = chain_keys(list(range(64)), 16)  # 4 blocks
    b = chain_keys(list(range(32)) + [999] * 32, 16)  # shares the first 2 blocks with a
    idx.insert("w1", a)
    idx.insert("w2", b)
    assert idx.match(a, ["w1", "w2", "w3"]) == {"w1": 4, "w2": 2, "w3": 0}
    assert idx.match(b, ["w1", "w2"]) == {"w1": 2, "w2": 4}


def test_a_gap_in_the_chain_stops_the_match():
    idx = PrefixIndex(capacity_blocks=100)
    keys = chain_keys(list(range(64)), 16)
    idx.insert("w1", [keys[0], keys[2], keys[3]])
    assert idx.match(keys, ["w1"]) == {"w1": 1}


def test_lru_bound_per_worker_evicts_oldest_blocks():
    idx = PrefixIndex(capacity_blocks=8)
    old = chain_keys(list(range(64)), 16)  # 4 blocks
    idx.insert("w1", old)
    for n in range(10):
        idx.insert("w1", chain_keys([n + 1000] * 32, 16))  # 2 fresh blocks each
    assert idx.blocks_of("w1") == 8
    assert idx.match(old, ["w1"]) == {"w1": 0}


def test_a_prompts_tail_is_forgotten_before_its_head_as_vllm_evicts():
    idx = PrefixIndex(capacity_blocks=6)
    old = chain_keys(list(range(64)), 16)  # 4 blocks
    idx.insert("w1", old)
    idx.insert("w1", chain_keys([1000] * 48, 16))  # 3 fresh blocks push 1 out
    # vLLM frees a request's blocks tail first, so its tail is evicted first and the
    # head still hits; forgetting the head first would lose the whole prefix
    assert idx.match(old, ["w1"]) == {"w1": 3}


def test_memory_stays_bounded_under_many_prompts():
    idx = PrefixIndex(capacity_blocks=50)
    for n in range(2000):
        idx.insert(f"w{n % 4}", chain_keys([n] * 64 + list(range(64)), 16))
    assert len(idx) <= 4 * 50
    assert len(idx._holders) <= 4 * 50


def test_recently_used_blocks_survive_eviction():
    idx = PrefixIndex(capacity_blocks=4)
    hot = chain_keys(list(range(32)), 16)  # 2 blocks
    idx.insert("w1", hot)
    idx.insert("w1", chain_keys([7] * 16, 16))
    idx.insert("w1", hot)  # touch
    idx.insert("w1", chain_keys([8] * 32, 16))
    assert idx.match(hot, ["w1"]) == {"w1": 2}


def test_drop_and_retain_workers():
    idx = PrefixIndex(capacity_blocks=10)
    keys = chain_keys(list(range(32)), 16)
    for w in ("w1", "w2", "w3"):
        idx.insert(w, keys)
    idx.drop_worker("w1")
    idx.retain_workers(["w2"])
    assert idx.match(keys, ["w1", "w2", "w3"]) == {"w1": 0, "w2": 2, "w3": 0}


def test_per_worker_capacity_follows_the_workers_real_kv_size():
    idx = PrefixIndex(capacity_blocks=100)
    idx.insert("w1", chain_keys(list(range(640)), 16))  # 40 blocks
    idx.set_capacity("w1", 10)
    assert idx.blocks_of("w1") == 10 and idx.capacity_of("w2") == 100
