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
