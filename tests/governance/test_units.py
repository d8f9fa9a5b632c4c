"""Pure pieces: loop signatures, keys, windows, prices, config."""

from __future__ import annotations

import pytest

from kvroute.router.config import Price
from kvroute.router.errors import ConfigError, Forbidden, Unauthorized
from kvroute.router.governance import loops
from kvroute.router.governance.budgets import Rates, applicable, refusal, slots_for
from kvroute.router.governance.config import parse_governance
from kvroute.router.governance.identity import Authenticator, attribution
from kvroute.router.governance.ledger import parse_window


def _agent_body(n_calls: int, tool: str = "search") -> dict:
    messages = [{"role": "user", "content": "go"}]
    for i in range(n_calls):
        messages += [{"role": "assistant", "tool_calls": [{"id": str(i), "function": {"name": tool}}]},
                     {"role": "tool", "content": f"result {i}"}]
    return {"messages": messages}


def test_loop_detection_needs_more_than_the_ratio_of_a_full_window():
    sigs = [loops.signature(_agent_body(i)) for i in range(1, 6)]
    assert loops.is_loop(list(reversed(sigs)), 5, 0.8) == "tool search"
    assert loops.is_loop(list(reversed(sigs))[:4], 5, 0.8) is None  # window not full
    mixed = [loops.signature({**_agent_body(1, t), "messages": [*_agent_body(1, t)["messages"],
                                                               {"role": "user", "content": w}]})
             for t, w in zip("abaab", ("one", "two", "three", "four", "five"))]
    assert loops.is_loop(mixed, 5, 0.5) == "tool a" and loops.is_loop(mixed, 5, 0.8) is None
    assert loops.signature(_agent_body(1, "a")) == loops.signature(_agent_body(1, "a"))
    same = [loops.signature({"messages": [{"role": "user", "content": f"Try again  {i}"}]}) for i in range(5)]
    assert loops.is_loop(same, 5, 0.8) == "repeated prompt"
    body = loops.inject({"messages": [{"role": "user", "content": "x"}]}, "stop")
    assert body["messages"][-1] == {"role": "system", "content": "stop"}


def test_keys_map_to_tenants_and_admins():
    cfg = parse_governance({"tenants": [{"name": "a", "keys": ["k1"]}], "admin_keys": ["adm"]})
    auth = Authenticator(cfg)
    assert auth.tenant_of("Bearer k1") == "a"
    with pytest.raises(Unauthorized):
        auth.tenant_of(None)
    with pytest.raises(Unauthorized):
        auth.tenant_of("Bearer nope")
    with pytest.raises(Forbidden):
        auth.tenant_of("Bearer adm")
    with pytest.raises(Forbidden):
        auth.require_admin("Bearer k1")
    auth.require_admin("bearer adm")
    assert Authenticator(parse_governance({})).tenant_of(None) == "anonymous"


def test_keys_file(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text("tenants: [{name: t, keys: [s1, s2]}]\nadmin_keys: [root]\n")
    cfg = parse_governance({"keys_file": str(f)})
    assert cfg.tenants[0].keys == ("s1", "s2") and cfg.admin_keys == ("root",)
    with pytest.raises(ConfigError, match="keys_file"):
        parse_governance({"keys_file": str(tmp_path / "missing.yaml")})


def test_slots_windows_and_refusals():
    cfg = parse_governance({"budgets": [
        {"name": "agent-day", "scope": "agent", "window": "day", "limit": {"usd": 5}},
        {"name": "acme-only", "scope": "tenant", "tenant": "acme", "limit": {"tokens": 10}, "window_s": 60},
    ]})
    attrs = attribution("anonymous", {"x-kvroute-agent": "bot"}, "s1")
    slots = slots_for(applicable(cfg.budgets, attrs), attrs, 86400 * 3 + 5, cfg.session_ttl_s)
    assert [s.key for _, s in slots] == ["session-default:anonymous/s1", "agent-day:anonymous/bot:86400/24"]
    assert (slots[1][1].bucket_s, slots[1][1].buckets) == (3600.0, 24) and not slots[0][1].rolling
    # without the store's word: the latest the current usage can be remembered (window + one bucket)
    message, retry = refusal(slots[1][0], "usd", 86400 * 3 + 5)
    assert "agent-day" in message and "last 24 hours" in message and "frees up at 1970-01-05T01:00:00Z" in message
    assert retry == 86400 + 3600 - 5
    message, retry = refusal(slots[1][0], "usd", 86400 * 3 + 5, frees_at=86400 * 3 + 7200)
    assert "frees up at 1970-01-04T02:00:00Z" in message and retry == 7200 - 5
    assert Rates.of(Price(input_per_m=2, cached_input_per_m=1, output_per_m=8)).cost(1000, 400, 100) == \
        pytest.approx((600 * 2 + 400 * 1 + 100 * 8) / 1e6)


def test_windows_parse():
    assert parse_window("day") == 86400 and parse_window("6h") == 21600 and parse_window("90") == 90
    with pytest.raises(ValueError):
        parse_window("fortnight")


@pytest.mark.parametrize("raw, key", [
    ({"budgets": [{"name": "x", "scope": "request", "limit": {"tool_calls": 3}}]}, "limit.tool_calls"),
    ({"budgets": [{"name": "x", "scope": "tenant", "limit": {"wall_s": 3}}]}, "limit.wall_s"),
    ({"budgets": [{"name": "x", "scope": "session", "window": "day", "limit": {"tokens": 3}}]}, "window"),
    ({"budgets": [{"name": "x", "scope": "tenant", "limit": {}}]}, "limit"),
    ({"budgets": [{"name": "x", "scope": "tenant", "limit": {"tokens": 1}, "buckets": 6}]}, "buckets"),
    ({"budgets": [{"name": "x", "scope": "tenant", "window": "day", "limit": {"tokens": 1}, "buckets": 0}]},
     "buckets"),
    ({"budgets": [{"name": "x", "scope": "tenant", "limit": {"tokens": 1}, "action": "pray"}]}, "action"),
    ({"loops": {"action": "shrug"}}, "loops.action"),
    ({"redis": {"url": "http://x"}}, "redis.url"),
    ({"tenants": [{"name": "a", "keys": ["k"]}, {"name": "b", "keys": ["k"]}]}, "tenants[1].keys"),
    ({"colour": 1}, "governance.colour"),
])
def test_config_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_governance(raw)


async def test_kill_switch_reads_a_url(aiohttp_server):
    import aiohttp
    from aiohttp import web

    from kvroute.router.governance.config import KillSwitchConfig
    from kvroute.router.governance.killswitch import KillSwitch
    from kvroute.router.governance.store import MemoryStore
    from tests.clock import FakeClock

    doc = {"kills": [{"scope": "tenant", "value": "acme", "reason": "invoice overdue"}]}
    async def kill_list(request: web.Request) -> web.Response:
        return web.json_response(doc)

    app = web.Application()
    app.router.add_get("/kill", kill_list)
    server = await aiohttp_server(app)
    ks = KillSwitch(KillSwitchConfig(url=str(server.make_url("/kill")), ttl_s=1), MemoryStore(), FakeClock())
    async with aiohttp.ClientSession() as session:
        await ks.refresh(session)
    assert ks.check("acme", None, "tiny") == ("tenant:acme", {"reason": "invoice overdue", "source": "url"})
    assert ks.check("globex", "bot", "tiny") is None


async def test_the_kill_switch_file_is_read_and_parsed_off_the_event_loop(tmp_path, monkeypatch):
    import os
    import threading

    from kvroute.router.governance import killswitch
    from kvroute.router.governance.config import KillSwitchConfig
    from kvroute.router.governance.store import MemoryStore
    from tests.clock import FakeClock

    kill_file = tmp_path / "kill.yaml"
    kill_file.write_text("- {scope: agent, value: coder, reason: runaway}\n")
    reads: list[str] = []
    load = killswitch._load_if_changed

    def recording(path, known_mtime):
        loaded = load(path, known_mtime)
        reads.append(threading.current_thread().name if loaded is not None else "unchanged")
        return loaded

    monkeypatch.setattr(killswitch, "_load_if_changed", recording)
    ks = killswitch.KillSwitch(KillSwitchConfig(file=str(kill_file), ttl_s=1), MemoryStore(), FakeClock())
    await ks.refresh()
    assert ks.check("acme", "coder", "tiny") == ("agent:coder", {"reason": "runaway", "source": "file"})
    await ks.refresh()  # same mtime: not read again
    kill_file.write_text("[]\n")
    os.utime(kill_file, (1, 1))  # a new mtime, whatever the clock's resolution
    await ks.refresh()
    assert ks.check("acme", "coder", "tiny") is None
    loop_thread = threading.current_thread().name
    assert reads[1] == "unchanged" and len(reads) == 3
    assert loop_thread not in (reads[0], reads[2])  # both reads ran in an executor thread
    kill_file.unlink()
    await ks.refresh()
    assert ks.entries() == []


def test_fleet_config_keys_parse_and_errors_name_the_key():
    cfg = parse_governance({
        "session_id": {"derive": ["fingerprint"], "ttl_s": 60},
        "budgets": [{"name": "r", "scope": "agent", "match": {"agent": "research", "tenant": ["a", "b"]},
                     "limit": {"usd": 2}, "action": "downgrade", "downgrade_at": 0.8,
                     "overrides": ["session-default"]}],
        "rate_limits": [{"name": "rpm", "per": "tenant", "requests_per_minute": 600, "window_s": 10}],
        "alerts": {"spike_by": ["tenant", "feature"], "webhooks": [
            {"url": "https://hooks.example/x", "kinds": ["threshold", "loop_detected"], "format": "slack"}]},
        "estimate_factor": 1.5})
    assert cfg.session_id.derive == ("fingerprint",) and cfg.session_id.ttl_s == 60
    b = cfg.budgets[1]
    assert b.match == {"agent": ("research",), "tenant": ("a", "b")} and b.downgrade_at == 0.8
    assert cfg.rate_limits[0].requests == 100  # 600 a minute is 100 per 10 s window
    assert cfg.alerts.webhooks[0].wants("threshold_70") and not cfg.alerts.webhooks[0].wants("spend_spike")
    assert parse_governance({"session_id": {"derive": "off"}}).session_id.derive == ()
    bad = [({"session_id": {"derive": ["dns"]}}, "governance.session_id.derive"),
           ({"budgets": [{"name": "x", "scope": "agent", "match": {"colour": "red"}, "limit": {"usd": 1}}]},
            r"governance.budgets\[0\].match.colour"),
           ({"budgets": [{"name": "x", "scope": "agent", "overrides": ["nope"], "limit": {"usd": 1}}]},
            r"governance.budgets\[0\].overrides"),
           ({"rate_limits": [{"name": "x", "per": "key"}]}, r"governance.rate_limits\[0\]"),
           ({"rate_limits": [{"name": "x", "per": "planet", "requests_per_minute": 1}]},
            r"governance.rate_limits\[0\].per"),
           ({"alerts": {"webhooks": [{"url": "https://h.example", "kinds": ["threshold_x"]}]}},
            r"governance.alerts.webhooks\[0\].kinds"),
           ({"alerts": {"webhooks": [{"url": "ftp://h"}]}}, r"governance.alerts.webhooks\[0\].url"),
           ({"alerts": {"spike_by": ["model"]}}, "governance.alerts.spike_by"),
           ({"estimate_factor": 0.5}, "governance.estimate_factor")]
    for raw, key in bad:
        with pytest.raises(ConfigError, match=key):
            parse_governance(raw)
