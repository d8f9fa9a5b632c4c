from router.config import config_from_dict
from router.fleet.discovery import DiscoveredWorker
from router.pipeline import ModelRoutes
from router.prefix import chain_keys


def test_discovered_workers_join_and_leave_their_pools_with_their_index_entries():
    cfg = config_from_dict({
        "discovery": {"mode": "k8s"},
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
