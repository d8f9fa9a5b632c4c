from kvroute.router.config import config_from_dict
from kvroute.router.prefix import chain_keys
from kvroute.router.routes import ModelRoutes
from kvroute.router.upstream.discovery import DiscoveredWorker


def test_discovered_workers_join_and_leave_their_pools_with_their_index_entries():
    cfg = config_from_dict({
        "discovery": {"source": "k8s"},
        "models": [{"name": "plain"},
                   {"name": "auto", "tiers": [{"name": "small"}, {"name": "large"}],
                    "classifier": {"thresholds": [0.5]}}],
    })
    routes = ModelRoutes(cfg)
    routes.apply_discovery([
        DiscoveredWorker("http://10.0.0.1:8000", "plain", None),
        DiscoveredWorker("http://10.0.0.2:8000", "auto", "small"),
        DiscoveredWorker("http://10.0.0.3:8000", "auto", "large"),
        DiscoveredWorker("http://10.0.0.4:8000", "other", None),
    ])
    assert [w.url for w in routes.get("plain").tiers[0].pool.all()] == ["http://10.0.0.1:8000"]
    small, large = routes.get("auto").tiers
    assert [w.url for w in small.pool.all()] == ["http://10.0.0.2:8000"]
    assert [w.tier for w in large.pool.all()] == ["large"]
    small.index.insert("http://10.0.0.2:8000", chain_keys(list(range(64)), 16))
    routes.apply_discovery([DiscoveredWorker("http://10.0.0.1:8000", "plain", None)])
    assert small.pool.all() == [] and len(small.index) == 0


def test_a_pool_hands_out_the_same_healthy_tuple_until_health_or_membership_changes():
    from kvroute.router.upstream.workers import WorkerPool

    pool = WorkerPool("m", ["http://a", "http://b", "http://c"])
    first = pool.healthy()
    assert pool.healthy() is first and [w.url for w in first] == ["http://a", "http://b", "http://c"]
    pool.get("http://b").healthy = False
    assert [w.url for w in pool.healthy()] == ["http://a", "http://c"]
    pool.get("http://b").healthy = True
    assert len(pool.healthy()) == 3
    gone = pool.get("http://c")
    pool.set_members([("http://a", None), ("http://b", None), ("http://d", None)])
    assert [w.url for w in pool.healthy()] == ["http://a", "http://b", "http://d"]
    gone.healthy = False  # a worker that left no longer touches its old pool
    assert len(pool.healthy()) == 3


def test_the_prefix_policy_never_picks_a_worker_that_turned_unhealthy():
    import random

    from kvroute.router.index import PrefixIndex
    from kvroute.router.policies.base import PolicyDeps, RequestContext
    from kvroute.router.policies.registry import create_policy
    from kvroute.router.upstream.workers import WorkerPool

    pool = WorkerPool("m", [f"http://w{i}" for i in range(4)])
    policy = create_policy("prefix", PolicyDeps(index=PrefixIndex(1000), rng=random.Random(0)), {})
    ctx = RequestContext(model="m", block_keys=tuple(chain_keys(list(range(64)), 16)), block_size=16,
                         prompt_tokens=64, max_tokens=16)
    holder = policy.select(pool.healthy(), ctx)
    policy.on_dispatch(holder, ctx)
    assert policy.select(pool.healthy(), ctx) is holder  # its cached map of the same tuple
    holder.healthy = False
    for _ in range(8):  # the prefix now has no healthy holder: placed anew, never on holder
        assert policy.select(pool.healthy(), ctx) is not holder
