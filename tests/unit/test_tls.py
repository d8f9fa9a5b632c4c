"""TLS on both sides: ``server.tls`` (the router serves HTTPS) and a pool's ``tls`` (how the
router checks its ``https://`` workers: a private CA, mutual TLS, or no check)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai
import pytest
import trustme
import yaml

from kvroute.benchmarks.backends.mock import fake_worker
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from kvroute.router.errors import ConfigError
from kvroute.router.secrets import Local
from tests.clock import until
from tests.unit.test_drain import free_port

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


class Pki:
    """A private CA, a certificate for 127.0.0.1 and a client certificate, as PEM files."""

    def __init__(self, folder: Path) -> None:
        self.ca = trustme.CA()
        self.ca_file = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.cert_file, self.key_file = folder / "cert.pem", folder / "key.pem"
        self.cert_file.write_bytes(b"".join(p.bytes() for p in self.server.cert_chain_pems))
        self.server.private_key_pem.write_to_path(str(self.key_file))
        client = self.ca.issue_cert("kvroute-router")
        self.client_cert, self.client_key = folder / "client.pem", folder / "client-key.pem"
        self.client_cert.write_bytes(b"".join(p.bytes() for p in client.cert_chain_pems))
        client.private_key_pem.write_to_path(str(self.client_key))

    def server_context(self, *, client_certs: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server.configure_cert(ctx)
        if client_certs:  # mutual TLS: the worker refuses callers without a certificate from the CA
            ctx.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path)


def config(url: str, tls: dict | None = None, **extra) -> dict:
    pool = {"name": "m", "workers": [url], "policy": "round_robin", **({"tls": tls} if tls else {})}
    return {"models": [pool], "health": {"interval_s": 0.2, "timeout_s": 2}, **extra}


async def https_worker(aiohttp_server, pki: Pki, *, client_certs: bool = False) -> str:
    server = await aiohttp_server(fake_worker("w1"), ssl=pki.server_context(client_certs=client_certs))
    url = str(server.make_url("")).rstrip("/")
    assert url.startswith("https://127.0.0.1:")
    return url


async def worker_health(client) -> dict:
    return (await (await client.get("/health")).json())["models"]["m"]["workers"][0]


async def test_the_router_serves_https_to_the_openai_client_and_calls_an_https_worker(aiohttp_server, pki,
                                                                                         tmp_path):
    worker = await https_worker(aiohttp_server, pki)
    port = free_port()
    cfg = config(worker, {"ca_file": str(pki.ca_file)},
                 server={"host": "127.0.0.1", "port": port,
                         "tls": {"cert_file": str(pki.cert_file), "key_file": str(pki.key_file)}})
    (tmp_path / "router.yaml").write_text(yaml.safe_dump(cfg))
    log = tmp_path / "router.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kvroute.router.cli", "serve", "--config",
                                 str(tmp_path / "router.yaml")], stdout=out, stderr=subprocess.STDOUT)
    url = f"https://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            async def ready() -> bool:
                assert proc.poll() is None, log.read_text()
                try:
                    async with session.get(url + "/readyz", ssl=pki.client_context()) as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await until(ready, timeout=60, poll_s=0.1)
            assert f"Running on {url}" in log.read_text()
            with pytest.raises(aiohttp.ClientError):  # plain HTTP to the TLS port
                await session.get(f"http://127.0.0.1:{port}/readyz")
            with pytest.raises(aiohttp.ClientConnectorCertificateError):  # a client that does not trust the CA
                await session.get(url + "/readyz")
        async with openai.DefaultAsyncHttpxClient(verify=pki.client_context()) as http:  # the openai client's own
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", http_client=http, max_retries=0)
            chat = await client.chat.completions.create(**CHAT)
            assert chat.choices[0].message.content == "hi from w1" and chat.usage.prompt_tokens == 11
            stream = await client.chat.completions.create(**CHAT, stream=True)
            assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "hi from w1"
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 10)


async def test_a_worker_whose_certificate_is_not_trusted_is_unhealthy_and_says_why(aiohttp_server, aiohttp_client,
                                                                                   pki):
    worker = await https_worker(aiohttp_server, pki)
    client = await aiohttp_client(create_app(config_from_dict(config(worker))))  # the system's CAs only

    async def down() -> bool:
        return not (await worker_health(client))["healthy"]

    await until(down, timeout=10)
    assert "TLS certificate not trusted" in (await worker_health(client))["last_error"]
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "no_healthy_worker"


async def test_verify_false_accepts_a_certificate_nobody_vouches_for(aiohttp_server, aiohttp_client, pki):
    worker = await https_worker(aiohttp_server, pki)
    client = await aiohttp_client(create_app(config_from_dict(config(worker, {"verify": False}))))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200 and (await resp.json())["usage"]["completion_tokens"] == 3


async def test_mutual_tls_sends_the_routers_client_certificate(aiohttp_server, aiohttp_client, pki):
    worker = await https_worker(aiohttp_server, pki, client_certs=True)
    mtls = {"ca_file": str(pki.ca_file), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
    client = await aiohttp_client(create_app(config_from_dict(config(worker, mtls))))
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200
    scraped = await client.get("/metrics")  # health, model list and scrape all use it too
    assert (await worker_health(client))["healthy"] and scraped.status == 200

    # Without the client certificate the worker refuses the handshake: unhealthy, and said why.
    client = await aiohttp_client(create_app(config_from_dict(config(worker, {"ca_file": str(pki.ca_file)}))))

    async def down() -> bool:
        return not (await worker_health(client))["healthy"]

    await until(down, timeout=10)
    assert (await worker_health(client))["last_error"] == ("health check failed: Server disconnected; if the worker "
                                                           "asks for a client certificate, set the pool's "
                                                           "tls.cert_file and key_file")


def test_config_errors_name_the_key(pki, tmp_path):
    bad_pem = tmp_path / "bad.pem"
    bad_pem.write_text("not a certificate")
    server = {"cert_file": str(pki.cert_file), "key_file": str(pki.key_file)}
    cases = [
        ({"server": {"tls": {"cert_file": str(pki.cert_file)}}}, None, "server.tls.key_file", "required"),
        ({"server": {"tls": {**server, "key_file": str(tmp_path / "nope.pem")}}}, None, "server.tls.key_file",
         "no such file"),
        ({"server": {"tls": {**server, "cert_file": str(bad_pem)}}}, None, "server.tls.cert_file", "do not load"),
        ({"server": {"tls": {**server, "key_file": str(pki.client_key)}}}, None, "server.tls.cert_file",
         "do not load"),  # another certificate's key
        ({}, {"ca_file": str(bad_pem)}, "models[0].tls.ca_file", "not a PEM CA bundle"),
        ({}, {"cert_file": str(pki.client_cert)}, "models[0].tls.key_file", "needs both"),
        ({}, {"verify": False, "ca_file": str(pki.ca_file)}, "models[0].tls.ca_file", "no effect"),
        ({}, {"verify": "no"}, "models[0].tls.verify", "expected bool"),
        ({}, {"ca": str(pki.ca_file)}, "models[0].tls.ca", "unknown key"),
    ]
    for extra, tls, key, problem in cases:
        with pytest.raises(ConfigError) as err:
            config_from_dict(config("https://127.0.0.1:1", tls, **extra))
        assert err.value.key == key and problem in str(err.value), (key, str(err.value))


def test_discovered_pods_of_a_pool_with_tls_are_called_over_https():
    from kvroute.router.routes import ModelRoutes
    from kvroute.router.upstream.discovery import DiscoveredWorker

    cfg = config_from_dict({"discovery": {"source": "k8s"},
                            "models": [{"name": "plain"}, {"name": "secure", "tls": {"verify": False}}]},
                           local=Local(check=False))
    routes = ModelRoutes(cfg)
    routes.apply_discovery([DiscoveredWorker("http://10.0.0.1:8000", "plain", None),
                            DiscoveredWorker("http://10.0.0.2:8443", "secure", None)])
    assert [w.url for w in routes.get("plain").tiers[0].pool.all()] == ["http://10.0.0.1:8000"]
    (secure,) = routes.get("secure").tiers[0].pool.all()
    assert secure.url == "https://10.0.0.2:8443" and secure.ssl is not True  # the pool's context


async def serial_served(port: int, trust: ssl.SSLContext) -> int:
    """The serial number of the certificate a new connection to ``port`` is shown."""
    from cryptography import x509

    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=trust)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    return x509.load_der_x509_certificate(der).serial_number


async def test_a_renewed_serving_certificate_is_used_without_a_restart(pki, tmp_path):
    from cryptography import x509

    port = free_port()
    cfg = config("http://127.0.0.1:9", server={"host": "127.0.0.1", "port": port, "tls": {
        "cert_file": str(pki.cert_file), "key_file": str(pki.key_file), "reload_s": 0.2}})
    (tmp_path / "router.yaml").write_text(yaml.safe_dump(cfg))
    log = tmp_path / "router.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kvroute.router.cli", "serve", "--config",
                                 str(tmp_path / "router.yaml")], stdout=out, stderr=subprocess.STDOUT)
    trust = pki.client_context()
    try:
        async def serving() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                await serial_served(port, trust)
                return True
            except OSError:
                return False

        await until(serving, timeout=60, poll_s=0.1)
        first = await serial_served(port, trust)
        renewed = pki.ca.issue_cert("127.0.0.1")
        pki.cert_file.write_bytes(b"".join(p.bytes() for p in renewed.cert_chain_pems))
        renewed.private_key_pem.write_to_path(str(pki.key_file))
        serial = x509.load_pem_x509_certificate(renewed.cert_chain_pems[0].bytes()).serial_number
        assert serial != first

        async def renewed_in_use() -> bool:
            return await serial_served(port, trust) == serial

        await until(renewed_in_use, timeout=10)
        assert "server.tls: reloaded" in log.read_text()
        # A certificate whose key has not been written yet: refused, the renewed one stays.
        pki.cert_file.write_bytes(pki.ca.issue_cert("127.0.0.1").cert_chain_pems[0].bytes())
        await until(lambda: "did not load, the previous certificate stays" in log.read_text(), timeout=10)
        assert await serial_served(port, trust) == serial
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 10)


async def test_a_pool_takes_a_new_ca_without_a_restart(aiohttp_server, aiohttp_client, pki, tmp_path):
    worker = await https_worker(aiohttp_server, pki)
    ca_file = tmp_path / "fleet-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))  # the wrong CA, at first
    client = await aiohttp_client(create_app(config_from_dict(
        config(worker, {"ca_file": str(ca_file), "reload_s": 0.2}))))

    async def healthy() -> bool:
        return (await worker_health(client))["healthy"]

    await until(lambda: _not(healthy), timeout=10)
    ca_file.write_bytes(pki.ca_file.read_bytes())  # the fleet's CA, as a renewed Secret brings it
    await until(healthy, timeout=10)
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200


async def _not(check) -> bool:
    return not await check()
