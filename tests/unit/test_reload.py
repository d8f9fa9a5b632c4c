"""SIGHUP re-reads the config file and applies its worker lists without a restart; a file
that does not load, and changes beyond the worker lists, are refused with a reason."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from kvroute.benchmarks.backends.mock import fake_worker
from kvroute.router import keys
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from kvroute.router.reload import reload, secret_files, watch_secrets
from tests.clock import until
from tests.unit.test_drain import free_port

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


class Served:
    """``kvroute --log-format json serve --config FILE`` in a subprocess."""

    def __init__(self, folder: Path, procs: int) -> None:
        self.port = free_port()
        self.file, self.log = folder / "router.yaml", folder / "router.log"
        self.procs = procs
        self.proc: subprocess.Popen | None = None

    def write(self, workers: list[str], **model) -> None:
        self.file.write_text(yaml.safe_dump({
            "models": [{"name": "m", "workers": workers, "policy": "round_robin", **model}],
            "server": {"host": "127.0.0.1", "port": self.port, "procs": self.procs, "drain_s": 1},
            "health": {"interval_s": 0.2, "timeout_s": 2}}))

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "kvroute.router.cli", "--log-format", "json", "serve",
                                          "--config", str(self.file)], stderr=out)

    def lines(self) -> list[dict]:
        return [json.loads(x) for x in self.log.read_text().splitlines() if x.startswith("{")]

    async def reloads(self, count: int) -> list[dict]:
        """Send SIGHUP; wait for ``count`` more reload outcomes in the log (one per process)."""
        assert self.proc is not None
        before = len(self._outcomes())
        self.proc.send_signal(signal.SIGHUP)
        await until(lambda: len(self._outcomes()) >= before + count, timeout=20)
        return self._outcomes()[before:]

    def _outcomes(self) -> list[dict]:
        return [x for x in self.lines() if x["message"].startswith("SIGHUP:") and "restart" not in x["message"]]


@pytest.fixture
async def served(tmp_path) -> AsyncIterator:
    made: list[Served] = []

    def make(procs: int = 1) -> Served:
        made.append(Served(tmp_path, procs))
        return made[-1]

    yield make
    for s in made:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.terminate()
            await asyncio.to_thread(s.proc.wait, 30)


async def worker_urls(aiohttp_server, *names: str) -> list[str]:
    return [str((await aiohttp_server(fake_worker(n))).make_url("")).rstrip("/") for n in names]


async def answers(url: str, n: int) -> set[str]:
    async with aiohttp.ClientSession() as session:
        out = set()
        for _ in range(n):
            async with session.post(f"{url}/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200
                out.add((await resp.json())["choices"][0]["message"]["content"])
        return out


async def test_sighup_applies_a_new_worker_list_and_refuses_a_bad_file(aiohttp_server, served):
    w1, w2 = await worker_urls(aiohttp_server, "w1", "w2")
    router = served()
    router.write([w1])
    router.start()
    url = f"http://127.0.0.1:{router.port}"

    async def up() -> bool:
        try:
            return await answers(url, 1) == {"hi from w1"}
        except aiohttp.ClientError:
            return False

    await until(up, timeout=60)
    router.write([w1, w2])
    (applied,) = await router.reloads(1)
    assert applied["level"] == "INFO" and f"m: +1 -0 ({w2})" in applied["message"]
    assert await answers(url, 4) == {"hi from w1", "hi from w2"}  # round robin over both
    router.write([w2])
    await router.reloads(1)
    assert await answers(url, 3) == {"hi from w2"}

    router.file.write_text("models: [{name: m, workers: [ftp://nope]}]\n")
    (failed,) = await router.reloads(1)
    assert failed["level"] == "ERROR" and "config key 'models[0].workers[0]'" in failed["message"]
    assert await answers(url, 2) == {"hi from w2"}  # it goes on with what it had

    router.write([w2], policy="least_loaded")  # not applied live: said so
    (unchanged,) = await router.reloads(1)
    assert "no worker list or key changed" in unchanged["message"]
    (later,) = [x for x in router.lines() if "next restart" in x["message"]]
    assert later["level"] == "WARNING" and "models['m']" in later["message"]
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        page = await resp.text()
    for result, n in (("applied", 2), ("failed", 1), ("unchanged", 1)):
        assert f'kvroute_config_reloads_total{{result="{result}"}} {n}.0' in page
    assert router.proc.poll() is None  # SIGHUP no longer ends the process


async def test_every_process_of_procs_n_reloads(aiohttp_server, served):
    w1, w2 = await worker_urls(aiohttp_server, "w1", "w2")
    router = served(procs=2)
    router.write([w1])
    router.start()
    await until(lambda: sum("processes serving" in x["message"] for x in router.lines()) == 1, timeout=60)
    router.write([w2])
    outcomes = await router.reloads(2)
    assert sorted(x["proc"] for x in outcomes) == [0, 1] and all("+1 -1" in x["message"] for x in outcomes)
    assert await answers(f"http://127.0.0.1:{router.port}", 6) == {"hi from w2"}


def catches_sighup(pid: int) -> bool:
    """The process has a handler for SIGHUP (Linux: bit 0 of SigCgt in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    (mask,) = [line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")]
    return bool(int(mask, 16) & 1)


async def test_a_sighup_while_processes_start_reaches_them_once_ready(aiohttp_server, served):
    """A process still starting has no handler for SIGHUP yet: the supervisor holds the
    signal until it is ready, instead of ending it."""
    (w1,) = await worker_urls(aiohttp_server, "w1")
    router = served(procs=2)
    router.write([w1])
    router.start()
    await until(lambda: catches_sighup(router.proc.pid), timeout=30)
    assert not any("processes serving" in x["message"] for x in router.lines())  # they are starting
    outcomes = await router.reloads(2)
    assert sorted(x["proc"] for x in outcomes) == [0, 1]
    assert all("no worker list or key changed" in x["message"] for x in outcomes)
    assert not any("exited" in x["message"] for x in router.lines()) and router.proc.poll() is None
    assert await answers(f"http://127.0.0.1:{router.port}", 2) == {"hi from w1"}


async def test_reload_in_process_and_discovery_owns_its_lists(aiohttp_server, tmp_path):
    w1, w2 = await worker_urls(aiohttp_server, "w1", "w2")
    app = create_app(config_from_dict({"models": [{"name": "m", "workers": [w1]}], "health": {"interval_s": 60}}))
    file = tmp_path / "router.yaml"
    file.write_text(yaml.safe_dump({"models": [{"name": "m", "workers": [w1, w2]}]}))
    assert await reload(app, file) == "applied"
    assert await reload(app, file) == "unchanged"
    assert [w.url for w in app[keys.ROUTES].get("m").tiers[0].pool.all()] == [w1, w2]

    dns = {"discovery": {"source": "dns", "services": {"m": "workers.local:8000"}}, "models": [{"name": "m"}]}
    app = create_app(config_from_dict(dns))
    file.write_text(yaml.safe_dump({**dns, "models": [{"name": "m", "workers": [w1]}]}))
    assert await reload(app, file) == "unchanged"  # discovery's lists are not the file's to set
    assert app[keys.ROUTES].get("m").tiers[0].pool.all() == []


async def test_keys_are_rotated_and_revoked_without_a_restart(aiohttp_server, aiohttp_client, tmp_path):
    """A leaked tenant key is revoked, and a worker's rotated API key is sent, from the next request."""
    (worker,) = [str((await aiohttp_server(fake_worker("w1", api_key="worker-key-2"))).make_url("")).rstrip("/")]
    key_file = tmp_path / "worker-key"
    key_file.write_text("worker-key-1")

    def write(tenant_keys: list[str]) -> dict:
        cfg = {"models": [{"name": "m", "workers": [worker], "api_key": {"file": str(key_file)}}],
               "governance": {"tenants": [{"name": "acme", "keys": tenant_keys}], "admin_keys": ["sk-admin"]},
               "health": {"interval_s": 60}}
        (tmp_path / "router.yaml").write_text(yaml.safe_dump(cfg))
        return cfg

    client = await aiohttp_client(create_app(config_from_dict(write(["sk-leaked", "sk-other"]))))

    async def status(key: str) -> int:
        resp = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"})
        return resp.status

    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-leaked"})
    assert (resp.status, await resp.json()) == (401, {"error": "Unauthorized"})  # the worker refuses the old key
    key_file.write_text("worker-key-2")
    write(["sk-other", "sk-new"])
    assert await reload(client.app, tmp_path / "router.yaml") == "applied"
    assert await status("sk-leaked") == 401 and await status("sk-new") == 200 and await status("sk-other") == 200
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-leaked"})
    assert (await resp.json())["error"]["message"] == "Incorrect API key provided."  # the router's own 401
    assert await reload(client.app, tmp_path / "router.yaml") == "unchanged"


async def test_a_changed_secret_file_reloads_the_config(aiohttp_server, aiohttp_client, tmp_path):
    """A Kubernetes Secret's update reaches its mounted file: the keys in it take effect
    without a signal."""
    (worker,) = await worker_urls(aiohttp_server, "w1")
    keys_file = tmp_path / "tenants.yaml"
    keys_file.write_text(yaml.safe_dump({"tenants": [{"name": "acme", "keys": ["sk-leaked"]}]}))
    cfg = {"models": [{"name": "m", "workers": [worker]}], "health": {"interval_s": 60},
           "governance": {"keys_file": str(keys_file), "admin_keys": [{"file": str(tmp_path / "admin")}]}}
    (tmp_path / "admin").write_text("sk-admin")
    (tmp_path / "router.yaml").write_text(yaml.safe_dump(cfg))
    assert secret_files(tmp_path / "router.yaml") == sorted([str(tmp_path / "admin"), str(keys_file)])
    client = await aiohttp_client(create_app(config_from_dict(cfg)))
    watcher = asyncio.create_task(watch_secrets(client.app, tmp_path / "router.yaml", interval_s=0.05))

    async def status(key: str) -> int:
        resp = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"})
        return resp.status

    try:
        assert await status("sk-leaked") == 200
        keys_file.write_text(yaml.safe_dump({"tenants": [{"name": "acme", "keys": ["sk-new-and-longer"]}]}))

        async def revoked() -> bool:
            return await status("sk-leaked") == 401

        await until(revoked, timeout=10)
        assert await status("sk-new-and-longer") == 200
    finally:
        watcher.cancel()
