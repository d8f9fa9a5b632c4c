"""Secret references in the config, and `kvroute config check`."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from kvroute.router.cli import main
from kvroute.router.config import config_from_dict
from kvroute.router.errors import ConfigError
from kvroute.router.secrets import Local

WORKER = "http://127.0.0.1:8101"


def with_secrets(**refs) -> dict:
    return {
        "models": [{"name": "m", "workers": [WORKER], "api_key": refs.get("api_key", {"env": "KVR_TEST_WORKER_KEY"})}],
        "governance": {
            "tenants": [{"name": "acme", "keys": [refs.get("tenant", {"file": "/run/secrets/acme"})]}],
            "admin_keys": [refs.get("admin", {"env": "KVR_TEST_ADMIN"})],
            "redis": {"url": refs.get("redis", {"env": "KVR_TEST_REDIS_URL"}),
                      "password": {"env": "KVR_TEST_REDIS_PW"}},
            "alerts": {"webhook_url": refs.get("hook", {"env": "KVR_TEST_HOOK"})},
        },
    }


def test_references_resolve_from_env_and_files_and_stay_out_of_reprs(monkeypatch, tmp_path):
    tenant_key = tmp_path / "acme"
    tenant_key.write_text("  sk-acme  \n")
    env = {"KVR_TEST_WORKER_KEY": "sk-worker", "KVR_TEST_ADMIN": "sk-admin", "KVR_TEST_REDIS_PW": "pw",
           "KVR_TEST_REDIS_URL": "redis://redis:6379/0", "KVR_TEST_HOOK": "https://hooks.example/t0k3n"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = config_from_dict(with_secrets(tenant={"file": str(tenant_key)}))
    gov = cfg.governance
    assert cfg.models[0].api_key == "sk-worker"
    assert gov.tenants[0].keys == ("sk-acme",) and gov.admin_keys == ("sk-admin",)
    assert gov.redis.url == "redis://redis:6379/0" and gov.redis.password == "pw"
    assert gov.alerts.webhook_url == "https://hooks.example/t0k3n"
    text = repr(cfg)
    for secret in ("sk-worker", "pw", "t0k3n", "redis://redis"):
        assert secret not in text


@pytest.mark.parametrize("refs, key", [
    ({}, "models[0].api_key.env"),  # not set in the environment
    ({"api_key": "sk-literal"}, "models[0].api_key"),  # a worker key must be a reference
    ({"api_key": {"vault": "x"}}, "models[0].api_key"),
    ({"api_key": {"env": ""}}, "models[0].api_key.env"),
])
def test_bad_or_missing_references_name_their_key(monkeypatch, refs, key):
    monkeypatch.delenv("KVR_TEST_WORKER_KEY", raising=False)
    with pytest.raises(ConfigError) as exc:
        config_from_dict(with_secrets(**refs))
    assert exc.value.key == key


def test_an_unreadable_secret_file_names_its_key(monkeypatch, tmp_path):
    monkeypatch.setenv("KVR_TEST_WORKER_KEY", "sk")
    with pytest.raises(ConfigError) as exc:
        config_from_dict(with_secrets(tenant={"file": str(tmp_path / "missing")}))
    assert exc.value.key == "governance.tenants[0].keys[0].file"


def test_without_local_checks_references_are_checked_in_form_only():
    cfg = config_from_dict({**with_secrets(), "models": [{"name": "m", "workers": [WORKER],
                                                          "tokenizer": "/models/not-here",
                                                          "api_key": {"file": "/run/secrets/key"}}]},
                           local=Local(check=False))
    assert cfg.models[0].api_key == "<file:/run/secrets/key>"
    assert cfg.models[0].tokenizer == "/models/not-here"
    with pytest.raises(ConfigError) as exc:
        config_from_dict(with_secrets(api_key="sk-literal"), local=Local(check=False))
    assert exc.value.key == "models[0].api_key"


def write(tmp_path, raw: dict):
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_config_check_passes_a_good_file_and_names_the_key_of_a_bad_one(tmp_path, capsys):
    good = write(tmp_path, {"models": [{"name": "m", "workers": [WORKER]}], "governance": {}})
    assert main(["config", "check", good]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    bad = write(tmp_path, {"models": [{"name": "m", "workers": [WORKER]}],
                           "governance": {"budgets": [{"name": "b", "scope": "agent", "limt": {"usd": 1}}]}})
    assert main(["config", "check", bad]) == 2
    assert "config key 'governance.budgets[0].limt'" in capsys.readouterr().err


def test_config_check_looks_at_this_machine_unless_told_not_to(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KVR_TEST_WORKER_KEY", raising=False)
    path = write(tmp_path, {"models": [{"name": "m", "workers": [WORKER], "tokenizer": "/models/not-here",
                                        "api_key": {"env": "KVR_TEST_WORKER_KEY"}}]})
    assert main(["config", "check", path]) == 2
    assert "models[0].tokenizer" in capsys.readouterr().err
    assert main(["config", "check", path, "--skip-local-checks"]) == 0


def test_k8s_discovery_without_the_extra_fails_at_start_naming_it(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "kubernetes_asyncio" else real(name, *a))
    path = write(tmp_path, {"models": [{"name": "m"}], "discovery": {"source": "k8s"}})
    assert main(["serve", "--config", path]) == 2
    assert "pip install 'kvroute[k8s]'" in capsys.readouterr().err


def test_literal_urls_are_checked_even_without_local_checks():
    raw = {"models": [{"name": "m", "workers": [WORKER]}], "governance": {"redis": {"url": "http://not-redis"}}}
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw, local=Local(check=False))
    assert exc.value.key == "governance.redis.url"
    raw["governance"] = {"alerts": {"webhook_url": "ftp://hooks"}}
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw, local=Local(check=False))
    assert exc.value.key == "governance.alerts.webhook_url"
