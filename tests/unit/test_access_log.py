"""The access log (``telemetry.access_log``): one JSON line per API request, as answered."""

from __future__ import annotations

import json

import pytest

from kvroute.benchmarks.backends.mock import fake_worker
from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from kvroute.router.errors import ConfigError
from kvroute.router.handlers import access_log_middleware

CHAT = {"model": "m", "messages": [{"role": "user", "content": "a secret prompt"}], "max_tokens": 3}


def config(url: str, access_log: dict | None, **extra) -> dict:
    return {"models": [{"name": "m", "workers": [url], "policy": "round_robin",
                        "price": {"input_per_m": 1.0, "output_per_m": 2.0}}],
            "health": {"interval_s": 60}, "telemetry": {"access_log": access_log} if access_log else {}, **extra}


@pytest.fixture
async def worker_url(aiohttp_server) -> str:
    return str((await aiohttp_server(fake_worker("w1"))).make_url("")).rstrip("/")


async def requests(client) -> dict[str, str]:
    """Whole, streamed, refused and listed; returns each answer's request id by name."""
    ids = {}
    for name, path, body in (("whole", "/v1/chat/completions", CHAT),
                             ("stream", "/v1/chat/completions", {**CHAT, "stream": True}),
                             ("unknown model", "/v1/chat/completions", {**CHAT, "model": "nope"}),
                             ("bad json", "/v1/chat/completions", None)):
        if body is None:
            resp = await client.post(path, data=b"{not json", headers={"Content-Type": "application/json"})
        else:
            resp = await client.post(path, json=body, headers={"x-kvroute-agent": "planner",
                                                               "X-Forwarded-For": "203.0.113.7, 10.0.0.2",
                                                               "User-Agent": "OpenAI/Python 1.99.0" + "x" * 300})
        await resp.read()
        ids[name] = resp.headers["x-request-id"]
    resp = await client.get("/v1/models")
    ids["models"] = resp.headers["x-request-id"]
    await client.get("/metrics")  # not an API request: not logged
    await client.get("/health")
    return ids


async def test_every_api_request_gets_one_line_with_what_it_was_answered(aiohttp_client, worker_url, tmp_path):
    path = tmp_path / "access.jsonl"
    client = await aiohttp_client(create_app(config_from_dict(config(worker_url, {"enabled": True,
                                                                                   "file": {"path": str(path)}}))))
    ids = await requests(client)
    client.app[keys.TELEMETRY].close()  # write out the queue
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {line["request_id"]: line for line in lines}
    assert len(lines) == 5 and set(by_id) == set(ids.values())
    whole, stream = by_id[ids["whole"]], by_id[ids["stream"]]
    for line in (whole, stream):
        assert (line["method"], line["path"], line["status"], line["model"], line["worker"], line["tries"]) == \
            ("POST", "/v1/chat/completions", 200, "m", worker_url, 1)
        assert line["prompt_tokens"] == 11 and line["completion_tokens"] == 3 and line["cached_tokens"] == 5
        assert line["cost_usd"] == pytest.approx((11 * 1.0 + 3 * 2.0) / 1e6)
        assert line["duration_ms"] > 0 and line["error"] is None
    assert whole["stream"] is False and whole["ttft_ms"] is None
    assert stream["stream"] is True and 0 < stream["ttft_ms"] <= stream["duration_ms"]
    assert (by_id[ids["unknown model"]]["status"], by_id[ids["unknown model"]]["error"]) == (404, "model_not_found")
    assert (by_id[ids["bad json"]]["status"], by_id[ids["bad json"]]["error"]) == (400, "invalid_request")
    assert "model" not in by_id[ids["bad json"]]  # it stopped before the request path
    assert (by_id[ids["models"]]["path"], by_id[ids["models"]]["status"]) == ("/v1/models", 200)
    assert "a secret prompt" not in path.read_text()  # no prompt text, ever
    assert whole["remote"] == "127.0.0.1" and whole["forwarded_for"] == "203.0.113.7, 10.0.0.2"
    assert whole["user_agent"].startswith("OpenAI/Python 1.99.0") and len(whole["user_agent"]) == 259  # capped
    assert by_id[ids["models"]]["forwarded_for"] is None and by_id[ids["models"]]["remote"] == "127.0.0.1"


async def test_without_a_file_lines_go_to_standard_error(aiohttp_client, worker_url, capsys):
    client = await aiohttp_client(create_app(config_from_dict(config(worker_url, {"enabled": True}))))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    await resp.read()
    client.app[keys.TELEMETRY].close()
    (line,) = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    assert line["request_id"] == resp.headers["x-request-id"] and line["status"] == 200


async def test_off_by_default_it_costs_no_middleware(aiohttp_client, worker_url):
    app = create_app(config_from_dict(config(worker_url, None)))
    assert access_log_middleware not in app.middlewares
    assert access_log_middleware in create_app(config_from_dict(config(worker_url, {"enabled": True}))).middlewares


def test_its_config_is_checked_with_the_key_named(tmp_path):
    with pytest.raises(ConfigError, match=r"telemetry.access_log.file.path.*no such folder"):
        config_from_dict(config("http://w:1", {"enabled": True, "file": {"path": str(tmp_path / "no" / "a.log")}}))
    with pytest.raises(ConfigError, match=r"telemetry.access_log.*colour"):
        config_from_dict(config("http://w:1", {"enabled": True, "colour": "red"}))
    with pytest.raises(ConfigError, match=r"telemetry.access_log.file"):
        config_from_dict(config("http://w:1", {"enabled": True, "file": {"path": str(tmp_path / "a.log")}},
                                server={"procs": 2}))
    config_from_dict(config("http://w:1", {"enabled": True}, server={"procs": 2}))  # standard error is fine
