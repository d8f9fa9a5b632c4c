"""router/validate.py: the one rule set both config parsers use."""

import pytest

from kvroute.router import validate as v
from kvroute.router.config import config_from_dict
from kvroute.router.errors import ConfigError
from kvroute.router.governance.config import parse_governance


def key_of(fn, *args, **kw) -> str:
    with pytest.raises(ConfigError) as err:
        fn(*args, **kw)
    assert str(err.value).startswith(f"config key '{err.value.key}': ")
    return err.value.key


def test_keys_are_joined_with_dots_and_indexes_and_stand_alone_at_the_root():
    assert v.join("models[0]", "workers") == "models[0].workers"
    assert v.join("models[0].workers", 1) == "models[0].workers[1]"
    assert v.join("", "server") == "server"
    assert key_of(v.only, {"colour": 1}, ("name",), "") == "colour"
    assert key_of(v.only, {"colour": 1}, ("name",), "models[0]") == "models[0].colour"


def test_get_checks_types_exactly_and_numbers_only_when_asked():
    raw = {"n": -3, "f": 2, "b": True, "s": "x", "none": None}
    assert v.get(raw, "n", int, "k") == -3  # no rule: any int
    assert v.get(raw, "f", float, "k") == 2.0 and isinstance(v.get(raw, "f", float, "k"), float)
    assert v.get(raw, "none", int, "k", 7) == 7 and v.get(raw, "absent", int, "k", 7) == 7
    assert key_of(v.get, raw, "n", int, "k", positive=True) == "k.n"
    assert key_of(v.get, raw, "n", int, "k", non_negative=True) == "k.n"
    assert key_of(v.get, raw, "b", int, "k") == "k.b"  # true is not a number
    assert key_of(v.get, raw, "s", float, "k") == "k.s"
    assert v.get(raw, "s", str, "k", choices=("x", "y")) == "x"
    assert key_of(v.get, raw, "absent", str, "k", choices=("x", "y")) == "k.absent"  # the default too
    assert key_of(v.required, {"name": ""}, "name", str, "k") == "k.name"


def test_lists():
    assert v.str_list(None, "k") == () and v.str_list(["a"], "k") == ("a",)
    assert key_of(v.str_list, ["a", ""], "k") == "k"
    assert v.number_list([1, 2.5], "k", "two") == (1.0, 2.5)
    assert key_of(v.number_list, [1, True], "k", "numbers") == "k"
    assert key_of(v.number_list, [2, 1], "k", "ascending", lambda xs: list(xs) == sorted(xs)) == "k"
    assert v.items(None, "k", "a list") == []
    assert key_of(v.items, [], "k", "a list", non_empty=True) == "k"
    assert key_of(v.http_url, "ftp://x", "k") == "k"
    with pytest.raises(ConfigError) as err:
        v.http_url("redis://:pw@x", "k", secret=True)
    assert "pw" not in str(err.value)


BASE = {"models": [{"name": "m", "workers": ["http://127.0.0.1:8101"]}]}


@pytest.mark.parametrize("raw, key", [
    ({**BASE, "discovery": {"port": 0}}, "discovery.port"),
    ({**BASE, "discovery": {"resync_s": 0}}, "discovery.resync_s"),
    ({**BASE, "discovery": {"interval_s": -1}}, "discovery.interval_s"),
    ({**BASE, "scrape": {"timeout_s": 0}}, "scrape.timeout_s"),
    ({"models": [{"name": "m", "workers": ["http://127.0.0.1:8101"], "price": {"output_per_m": -1}}]},
     "models[0].price.output_per_m"),
])
def test_router_numbers_with_a_rule(raw, key):
    assert key_of(config_from_dict, raw) == key


def test_router_numbers_without_a_rule_may_be_zero_or_negative():
    kv = {"port_offset": -443}
    cfg = config_from_dict({"models": [{"name": "m", "workers": ["http://127.0.0.1:8101"], "tokenizer": "/",
                                        "price": {"input_per_m": 0}, "kv_events": kv}]})
    assert cfg.models[0].kv_events.port_offset == -443 and cfg.models[0].price.input_per_m == 0


def test_governance_numbers_with_and_without_a_rule():
    assert parse_governance({"alerts": {"webhook_retries": 0}}).alerts.webhook_retries == 0
    assert key_of(parse_governance, {"alerts": {"webhook_retries": -1}}) == "governance.alerts.webhook_retries"
    assert key_of(parse_governance, {"default_max_tokens": 0}) == "governance.default_max_tokens"
    assert key_of(parse_governance, {"kill_switch": {"url": "http://"}}) == "governance.kill_switch.url"
    assert key_of(parse_governance, {"budgets": {}}) == "governance.budgets"
