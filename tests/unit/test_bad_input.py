"""Inputs from a fuzz corpus that once gave 500s or aiohttp's plain-text errors: each must be
a clear 4xx with an OpenAI error body. Sent as raw bytes, as a fuzzer sends them, to the
router served by ``router/server.py``'s runner (what ``kvroute serve`` runs)."""

from __future__ import annotations

import asyncio
import gzip
import importlib.util
import zlib

import orjson
import pytest
from aiohttp.test_utils import TestServer

from kvroute.benchmarks.backends.mock import fake_worker
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from kvroute.router.errors import InvalidRequest
from kvroute.router.requests import COMPLETION, EMBEDDING, parse_request
from kvroute.router.server import AppRunner

KEY = "sk-acme"
BODY = orjson.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3})


class RouterServer(TestServer):
    """The test server on kvroute's own runner, as ``kvroute serve`` runs the app."""

    async def _make_runner(self, **kwargs):
        return AppRunner(self.app, **kwargs)


@pytest.fixture
async def port(aiohttp_server):
    upstream = await aiohttp_server(fake_worker())
    cfg = config_from_dict({
        "models": [{"name": "tiny", "workers": [str(upstream.make_url("")).rstrip("/")], "policy": "prefix"}],
        "health": {"interval_s": 60},
        "governance": {"tenants": [{"name": "acme", "keys": [KEY]}]},  # reads Authorization
    })
    server = RouterServer(create_app(cfg))
    await server.start_server()
    yield server.port
    await server.close()


async def send(port: int, headers: list[tuple[bytes, bytes]], body: bytes = BODY,
               path: bytes = b"/v1/chat/completions") -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 request (with the tenant's key unless ``headers`` has one); the status,
    headers (lower-cased) and body of the answer."""
    if not any(k.lower() == b"authorization" for k, _ in headers):
        headers = [(b"Authorization", b"Bearer " + KEY.encode()), *headers]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = [b"POST " + path + b" HTTP/1.1", b"Host: router", b"Content-Type: application/json",
            b"Content-Length: %d" % len(body), b"Connection: close", *(k + b": " + v for k, v in headers)]
    writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    head_text, _, payload = rest.partition(b"\r\n\r\n")
    fields = dict(line.decode().split(": ", 1) for line in head_text.split(b"\r\n") if line)
    return int(status_line.split()[1]), {k.lower(): v for k, v in fields.items()}, payload


def openai_error(headers: dict[str, str], payload: bytes) -> dict:
    assert headers["content-type"].startswith("application/json"), headers
    err = orjson.loads(payload)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


async def test_a_plain_request_is_served(port):
    status, _, payload = await send(port, [(b"x-kvroute-session", b"agent-7")])
    assert status == 200 and orjson.loads(payload)["choices"]


@pytest.mark.parametrize("name", [b"x-kvroute-session", b"x-kvroute-agent", b"traceparent", b"Authorization"])
@pytest.mark.parametrize("value", [b"\xff\xfe-session", "s\u00e9ance".encode(), b"ok\x01ctrl"],
                         ids=["invalid-utf8", "utf8", "control-char"])
async def test_a_non_ascii_header_the_router_reads_is_a_400(port, name, value):
    if name == b"Authorization":
        value = b"Bearer " + value
    status, headers, payload = await send(port, [(name, value)])
    assert status == 400
    err = openai_error(headers, payload)
    assert err["code"] == "invalid_request"
    if b"\x01" not in value:  # a control character aiohttp's parser refuses itself, naming no header
        assert err["param"] == name.decode().lower()


async def test_a_non_ascii_header_the_router_ignores_is_fine(port):
    status, _, _ = await send(port, [(b"user-agent", "caf\u00e9".encode())])
    assert status == 200


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate"])
async def test_content_encoding_over_a_plain_body_is_a_400(port, encoding):
    status, headers, payload = await send(port, [(b"Content-Encoding", encoding)])
    assert status == 400
    err = openai_error(headers, payload)
    assert err["param"] == "content-encoding" and encoding.decode() in err["message"]


@pytest.mark.parametrize("encoding, encode", [(b"gzip", gzip.compress), (b"deflate", zlib.compress)])
async def test_an_encoded_body_is_decoded(port, encoding, encode):
    status, _, payload = await send(port, [(b"Content-Encoding", encoding)], encode(BODY))
    assert status == 200 and orjson.loads(payload)["choices"]


@pytest.mark.parametrize("encoding", [b"compress", b"gzip, gzip", b"x-unknown"])
async def test_an_encoding_the_router_cannot_decode_is_a_415(port, encoding):
    status, headers, payload = await send(port, [(b"Content-Encoding", encoding)])
    assert status == 415
    assert openai_error(headers, payload)["code"] == "unsupported_content_encoding"


@pytest.mark.skipif(importlib.util.find_spec("brotli") is not None, reason="Brotli installed: br is decoded")
async def test_br_without_brotli_is_a_415_not_plain_text(port):
    status, headers, payload = await send(port, [(b"Content-Encoding", b"br")])
    assert status == 415
    assert openai_error(headers, payload)["code"] == "unsupported_content_encoding"


@pytest.mark.parametrize("headers", [
    [(b"x-big", b"a" * 9000)],
    [(b"x-kvroute-session", b"s" * 9000)],
    [(b"x-h%d" % i, b"v") for i in range(200)],
], ids=["one-long-header", "long-session", "too-many-headers"])
async def test_oversized_headers_are_a_431_with_an_openai_body(port, headers):
    status, fields, payload = await send(port, headers)
    assert status == 431
    assert openai_error(fields, payload)["code"] == "headers_too_large"


async def test_a_malformed_request_line_is_a_400_with_an_openai_body(port):
    status, headers, payload = await send(port, [], path=b"/v1/chat completions")
    assert status == 400
    assert openai_error(headers, payload)["code"] == "invalid_request"


@pytest.mark.parametrize("kind, body, param", [
    (COMPLETION, {"prompt": [-1, 99999999999]}, "prompt"),  # found by the fuzz: a 500 in the block hashes
    (COMPLETION, {"prompt": [[1, 2], [2**32]]}, "prompt"),
    (COMPLETION, {"prompt": [1, True]}, "prompt"),
    (EMBEDDING, {"input": [-5]}, "input"),
    (EMBEDDING, {"input": [[3], [2**40]]}, "input"),
])
def test_token_ids_outside_32_bits_are_a_400_before_any_hashing(kind, body, param):
    with pytest.raises(InvalidRequest) as err:
        parse_request(kind, orjson.dumps({"model": "tiny", **body}), {})
    assert err.value.param == param
    parse_request(COMPLETION, orjson.dumps({"model": "tiny", "prompt": [0, 2**32 - 1]}), {})  # the edges pass
