import pytest

from kvroute.router.config import config_from_dict, load_config
from kvroute.router.errors import ConfigError


def base(**model) -> dict:
    return {"models": [{"name": "m", "workers": ["http://127.0.0.1:8101"], **model}]}


def test_minimal_config_gets_defaults():
    cfg = config_from_dict(base())
    m = cfg.models[0]
    assert m.policy == "prefix" and m.served_name == "m" and m.block_size is None
    assert cfg.server.port == 8080 and cfg.server.max_body_bytes == 8 * 1024 * 1024


@pytest.mark.parametrize("raw, key", [
    ({}, "models"),
    ({"models": []}, "models"),
    ({"models": [{"workers": ["http://a:1"]}]}, "models[0].name"),
    (base(workers=["ftp://a"]), "models[0].workers[0]"),
    (base(workers=["http://a:1", "http://a:1"]), "models[0].workers"),
    (base(workers="http://a:1"), "models[0].workers"),
    (base(policy="fastest"), "models[0].policy"),
    (base(policy_options={"bogus": 1}), "models[0].policy_options.bogus"),
    (base(block_size=0), "models[0].block_size"),
    (base(block_size="16"), "models[0].block_size"),
    (base(tokenizer="/does/not/exist"), "models[0].tokenizer"),
    (base(colour="blue"), "models[0].colour"),
    ({**base(), "server": {"port": "eighty"}}, "server.port"),
    ({**base(), "server": {"max_body_bytes": -5}}, "server.max_body_bytes"),
    ({**base(), "health": {"interval_s": True}}, "health.interval_s"),
    ({**base(), "discovery": {"source": "consul"}}, "discovery.source"),
    ({**base(), "unknown_section": {}}, "unknown_section"),
    ({**base(), "log_prompts": True}, "log_prompts"),  # not a key (yet)
    ({**base(), "discovery": {"mode": "k8s"}}, "discovery.mode"),  # renamed: discovery.source
    ({"models": [{"name": "m"}]}, "models[0].workers"),
    # reliability: timeouts per pool, retries and breakers (docs/reliability.md)
    (base(timeouts={"first_byte_s": 0}), "models[0].timeouts.first_byte_s"),
    (base(timeouts={"idle_s": "1m"}), "models[0].timeouts.idle_s"),
    (base(timeouts={"read_s": 5}), "models[0].timeouts.read_s"),
    (base(timeouts=30), "models[0].timeouts"),
    (base(timeouts={"connect_s": 10}), "models[0].timeouts.connect_s"),  # above server.connect_timeout_s
    ({**base(timeouts={"idle_s": 120}), "server": {"request_timeout_s": 60}}, "models[0].timeouts.idle_s"),
    ({"models": [{"name": "m", "timeouts": {}, "tiers": [{"name": "s", "workers": ["http://a:1"]}]}]},
     "models[0].timeouts"),
    ({"models": [{"name": "m", "tiers": [{"name": "s", "workers": ["http://a:1"],
                                          "timeouts": {"first_byte_s": -1}}]}]},
     "models[0].tiers[0].timeouts.first_byte_s"),
    ({**base(), "retries": {"max_attempts": 0}}, "retries.max_attempts"),
    ({**base(), "retries": {"budget_ratio": -0.1}}, "retries.budget_ratio"),
    ({**base(), "retries": {"backoff_base_s": 1, "backoff_max_s": 0.5}}, "retries.backoff_max_s"),
    ({**base(), "retries": {"budget": 0.1}}, "retries.budget"),
    ({**base(), "breaker": {"failures": 0}}, "breaker.failures"),
    ({**base(), "breaker": {"failures": 2.5}}, "breaker.failures"),
    ({**base(), "breaker": {"cooldown_s": 0}}, "breaker.cooldown_s"),
    ({**base(), "breaker": []}, "breaker"),
])
def test_errors_name_the_bad_key(raw, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert err.value.key == key
    assert f"'{key}'" in str(err.value)


def test_duplicate_model_names_are_rejected():
    raw = {"models": [base()["models"][0], base()["models"][0]]}
    with pytest.raises(ConfigError, match=r"models\[1\].name"):
        config_from_dict(raw)


def test_load_config_reads_yaml_and_reports_file_errors(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("models:\n  - name: m\n    workers: [http://127.0.0.1:9]\n    policy: round_robin\n")
    assert load_config(good).models[0].policy == "round_robin"
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_k8s_discovery_allows_models_without_static_workers():
    cfg = config_from_dict({"models": [{"name": "m"}], "discovery": {"source": "k8s", "namespace": "ns"}})
    assert cfg.discovery.source == "k8s" and cfg.models[0].workers == ()


def test_reliability_defaults_and_overrides():
    cfg = config_from_dict(base())
    t, r, b = cfg.models[0].timeouts, cfg.retries, cfg.breaker
    assert (t.connect_s, t.first_byte_s, t.idle_s) == (None, 60.0, 60.0)  # connect_s: the server's
    assert (r.max_attempts, r.backoff_base_s, r.backoff_max_s, r.budget_ratio, r.min_retries_per_s,
            r.retry_after_max_s) == (3, 0.025, 0.25, 0.1, 1.0, 1.0)
    assert (b.failures, b.cooldown_s) == (5, 10.0)
    # a default above a lowered overall bound is no error: the bound wins
    assert config_from_dict({**base(), "server": {"request_timeout_s": 30}}).models[0].timeouts.idle_s == 60.0
    cfg = config_from_dict({"models": [{"name": "m", "tiers": [
        {"name": "s", "workers": ["http://a:1"], "timeouts": {"connect_s": 1, "first_byte_s": 20, "idle_s": 5}},
        {"name": "l", "workers": ["http://b:1"]}]}],
        "retries": {"max_attempts": 1}, "breaker": {"failures": 3, "cooldown_s": 2}})
    small, large = cfg.models[0].tiers
    assert (small.timeouts.connect_s, small.timeouts.first_byte_s, small.timeouts.idle_s) == (1.0, 20.0, 5.0)
    assert large.timeouts.first_byte_s == 60.0
    assert cfg.retries.max_attempts == 1 and (cfg.breaker.failures, cfg.breaker.cooldown_s) == (3, 2.0)
