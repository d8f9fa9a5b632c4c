"""LoRA adapters and ``cache_salt``: vLLM hashes both into a prompt's KV blocks, so the
router's keys of the same tokens under another adapter or salt must differ, on the request
side (``ModelRoute.context``) and on the event side (``BlockStored``'s ``lora_name`` and the
first block's ``extra_keys``), and match each other."""

from __future__ import annotations

import orjson
import pytest

from kvroute.router.config import config_from_dict
from kvroute.router.errors import ConfigError
from kvroute.router.kv_events import WorkerEvents
from kvroute.router.kv_index import ExactIndex
from kvroute.router.metrics import RouterMetrics
from kvroute.router.prefix import chain_keys, root_key
from kvroute.router.requests import CHAT, COMPLETION, parse_request
from kvroute.router.routes import Executors, ModelRoutes
from kvroute.router.upstream.discovery import DiscoveredWorker
from tests.governance.conftest import worker_url
from tests.unit.apis import config

TOKENS = list(range(1, 13))  # three blocks of 4


def stored(hashes, tokens, lora=None, extra=None, parent=None):
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": 4, "lora_id": 1 if lora else None, "medium": "GPU", "lora_name": lora, "extra_keys": extra}


def test_roots_tell_adapters_and_salts_apart():
    roots = [root_key(), root_key("sql"), root_key(None, "sql"), root_key("sql", "t1"), root_key("other")]
    assert roots[0] == 0 and len(set(roots)) == len(roots)
    keys = [chain_keys(TOKENS, 4, r) for r in roots]
    assert len({k[0] for k in keys}) == len(roots)  # not one block in common


@pytest.mark.parametrize("lora, extra, want", [
    (None, None, root_key()),
    ("sql", [["sql"], ["sql"], ["sql"]], root_key("sql")),
    (None, [["tenant-a"], None, None], root_key(None, "tenant-a")),
    ("sql", [["sql", "tenant-a"], ["sql"], ["sql"]], root_key("sql", "tenant-a")),
    (None, [[["image-1", 0], "tenant-a"], None, None], root_key(None, "tenant-a")),  # an image's pair is not a salt
])
def test_an_event_chain_starts_from_its_adapter_and_salt(lora, extra, want):
    index = ExactIndex(capacity_blocks=100, speculative_ttl_s=5)
    WorkerEvents("w1", index).apply_event(stored([11, 12], TOKENS[:8], lora, extra[:2] if extra else None))
    assert index.confirmed_blocks("w1") == set(chain_keys(TOKENS[:8], 4, want))


def test_a_child_block_continues_its_parents_chain():
    index = ExactIndex(capacity_blocks=100, speculative_ttl_s=5)
    events = WorkerEvents("w1", index)
    events.apply_event(stored([11, 12], TOKENS[:8], "sql", [["sql", "t"], ["sql"]]))
    events.apply_event(stored([13], TOKENS[8:], "sql", [["sql"]], parent=12))
    assert index.confirmed_blocks("w1") == set(chain_keys(TOKENS, 4, root_key("sql", "t")))


async def test_a_lora_route_and_a_salted_request_key_apart(tiny_model_dir):
    pool = {"workers": ["http://127.0.0.1:9"], "tokenizer": str(tiny_model_dir), "block_size": 32}
    cfg = config_from_dict({"models": [{"name": "base", "upstream_model": "tiny", **pool},
                                       {"name": "sql", "upstream_model": "tiny-sql", "lora": True, **pool}]})
    routes = ModelRoutes(cfg, Executors(), RouterMetrics())
    base, sql = routes.by_key["base"], routes.by_key["sql"]
    prompt = "The quick brown fox jumps over the lazy dog. " * 40

    async def keys(route, **extra):
        req = parse_request(COMPLETION, orjson.dumps({"model": route.cfg.name, "prompt": prompt, **extra}), {})
        return (await route.context(req)).block_keys

    plain, adapted = await keys(base), await keys(sql)
    salted, salted_adapter = await keys(base, cache_salt="t1"), await keys(sql, cache_salt="t1")
    assert plain and not set(plain) & set(adapted)
    assert not set(plain) & set(salted) and not set(salted) & set(salted_adapter)
    assert await keys(base, cache_salt="t1") == salted and await keys(base) == plain  # stable


@pytest.mark.parametrize("salt", ["", 3, ["t"]])
async def test_a_bad_cache_salt_is_a_400(aiohttp_client, upstream, salt):
    from kvroute.router.app import create_app

    client = await aiohttp_client(create_app(config(worker_url(upstream))))
    resp = await client.post("/v1/chat/completions", json={"model": "tiny", "cache_salt": salt,
                                                           "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "cache_salt"


def test_lora_must_be_a_boolean():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"models": [{"name": "m", "workers": ["http://a:1"], "lora": "yes"}]})
    assert "models[0].lora" in str(err.value)
    assert parse_request(CHAT, orjson.dumps({"model": "m", "cache_salt": "t", "messages": [
        {"role": "user", "content": "x"}]}), {}).body["cache_salt"] == "t"


def test_an_adapter_takes_its_base_models_workers_static_or_discovered():
    base = {"name": "llama", "workers": ["http://a:1", "http://b:1"]}
    cfg = config_from_dict({"models": [base, {"name": "sql", "lora": True, "workers_from": "llama"}]})
    assert cfg.models[1].workers == ("http://a:1", "http://b:1")
    cfg = config_from_dict({"discovery": {"source": "k8s"}, "models": [
        {"name": "llama"}, {"name": "auto", "tiers": [{"name": "small"}, {"name": "sql", "workers_from": "auto/small",
                                                                           "lora": True}],
                            "classifier": {"thresholds": [0.5]}},
        {"name": "sql", "lora": True, "workers_from": "llama"}]})
    routes = ModelRoutes(cfg)
    routes.apply_discovery([DiscoveredWorker("http://10.0.0.1:8000", "llama", None),
                            DiscoveredWorker("http://10.0.0.2:8000", "auto", "small")])
    assert [w.url for w in routes.get("sql").tiers[0].pool.all()] == ["http://10.0.0.1:8000"]
    assert [w.url for w in routes.get("auto").tiers[1].pool.all()] == ["http://10.0.0.2:8000"]
    routes.apply_discovery([])
    assert routes.get("sql").tiers[0].pool.all() == []


@pytest.mark.parametrize("models, where", [
    ([{"name": "sql", "workers_from": "nope", "workers": ["http://a:1"]}], "models[0].workers_from"),
    ([{"name": "sql", "workers_from": "sql", "workers": ["http://a:1"]}], "models[0].workers_from"),
    ([{"name": "a", "workers": ["http://a:1"]}, {"name": "b", "workers_from": "a"}, {"name": "c", "workers_from": "b"}],
     "models[2].workers_from"),
    ([{"name": "a", "workers": ["http://a:1"]}, {"name": "b", "workers_from": "a", "workers": ["http://b:1"]}],
     "models[1].workers"),
])
def test_workers_from_names_one_other_pool(models, where):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"models": models})
    assert f"'{where}'" in str(err.value)


def test_pools_on_one_tokenizer_folder_share_one_tokenizer(tiny_model_dir, tmp_path):
    other = tmp_path / "copy"
    other.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    pool = {"workers": ["http://127.0.0.1:9"], "tokenizer": str(tiny_model_dir)}
    cfg = config_from_dict({"models": [{"name": "base", **pool}, {"name": "sql", "lora": True, **pool},
                                       {"name": "other", **pool, "tokenizer": str(other)}]})
    routes = ModelRoutes(cfg, Executors(), RouterMetrics())
    base, sql, elsewhere = (routes.by_key[k].prefixer.tokenizer for k in ("base", "sql", "other"))
    assert base is sql and base is not None and elsewhere is not base
