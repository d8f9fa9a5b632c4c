"""Property-based fuzz of the HTTP API: whatever a client sends, the router answers below 500,
with an OpenAI-shaped error body when it refuses, and stays up.

Requests are raw bytes over a socket (as a fuzzer sends them: aiohttp's client would refuse
to send most of these) to the router on ``router/server.py``'s runner (what ``kvroute
serve`` runs), in front of the mock worker, with governance reading API keys. Cases mix
bodies (valid requests with one field swapped for junk, arbitrary JSON, huge and
non-finite numbers, unicode and lone surrogates, deep nesting, bytes that are not JSON,
compressed and not), headers (the ones the router reads with non-ASCII, control and
oversized values, content-encodings it can and cannot decode) and methods and paths.

Framing headers (Content-Length, Transfer-Encoding, Connection, Host, Expect) are the
test's own: a wrong length makes any HTTP server wait for bytes that never come, which says
nothing about the router. The examples are derandomized, so CI runs the same cases every
time; tests/unit/test_bad_input.py keeps the cases an earlier fuzz found.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import zlib

import orjson
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from kvroute.benchmarks.backends.mock import fake_worker
from kvroute.router.app import create_app
from kvroute.router.config import config_from_dict
from tests.unit.test_bad_input import RouterServer

KEY = "sk-acme"
ADMIN = "sk-admin"
VALID_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
VALID_COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 3}
VALID_EMBEDDING = {"model": "tiny", "input": ["hello", "there"]}
VALID_RESPONSES = {"model": "tiny", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
                   "instructions": "be brief", "max_output_tokens": 3}
VALID_MESSAGES = {"model": "tiny", "max_tokens": 3, "system": "be brief",
                  "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
VALID_TOKENIZE = {"model": "tiny", "prompt": "hello"}
VALID_DETOKENIZE = {"model": "tiny", "tokens": [104, 105]}
VALID_RERANK = {"model": "tiny", "query": "what is a KV cache?", "documents": ["a cache", "a router"], "top_n": 1}
VALID_SCORE = {"model": "tiny", "text_1": "what is a KV cache?", "text_2": ["a cache", "a router"]}
VALID_CLASSIFY = {"model": "tiny", "input": ["is this urgent?", "not at all"]}
VALID_POOLING = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}]}
VALID_GENERATE = {"model": "tiny", "token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 3}}
VALID_RENDER = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
VALID_CHAT_BATCH = {"model": "tiny", "messages": [[{"role": "user", "content": "hello"}],
                                                  [{"role": "user", "content": "there"}]], "max_tokens": 3}
VALID_COHERE_EMBED = {"model": "tiny", "texts": ["hello", "there"], "input_type": "search_query",
                      "embedding_types": ["float"]}
VALID_COHERE_CHAT = {"model": "tiny", "max_tokens": 3, "documents": ["a doc"],
                     "messages": [{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                                  {"role": "user", "content": "hello"}]}
VALID_GENERATIVE_SCORING = {"model": "tiny", "query": "Is this positive?", "items": ["yes", "no"],
                            "label_token_ids": [5, 6]}
VALID = {"/v1/chat/completions": VALID_CHAT, "/v1/completions": VALID_COMPLETION, "/v1/embeddings": VALID_EMBEDDING,
         "/v1/responses": VALID_RESPONSES, "/v1/messages": VALID_MESSAGES, "/tokenize": VALID_TOKENIZE,
         "/detokenize": VALID_DETOKENIZE, "/rerank": VALID_RERANK, "/v1/score": VALID_SCORE,
         "/classify": VALID_CLASSIFY, "/pooling": VALID_POOLING, "/inference/v1/generate": VALID_GENERATE,
         "/v1/chat/completions/render": VALID_RENDER, "/v1/chat/completions/batch": VALID_CHAT_BATCH,
         "/v2/embed": VALID_COHERE_EMBED, "/generative_scoring": VALID_GENERATIVE_SCORING,
         "/cohere/v2/chat": VALID_COHERE_CHAT}
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages",
         "/tokenize", "/detokenize", "/rerank", "/v1/score", "/classify", "/pooling", "/inference/v1/generate",
         "/v1/chat/completions/render", "/v1/chat/completions/batch", "/v2/embed", "/generative_scoring",
         "/cohere/v2/chat", "/v1/responses/resp_x",
         "/v1/responses/resp_x/cancel",
         "/v1/models", "/health", "/livez", "/readyz", "/metrics",
         "/v1/kvroute/spend", "/v1/kvroute/admin/kill", "/v1/kvroute/admin/alerts", "/", "/v1", "/nope"]
METHODS = ["POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "post", "BREW"]
# Headers the router reads, and a few it does not; never the framing ones (see above).
HEADER_NAMES = ["x-kvroute-session", "x-kvroute-agent", "x-kvroute-feature", "x-kvroute-tier", "x-kvroute-tenant",
                "x-api-key", "traceparent", "Authorization", "Content-Type", "Content-Encoding", "Accept",
                "Accept-Encoding", "User-Agent", "X-Forwarded-For", "x-junk"]
ENCODINGS = ["gzip", "deflate", "br", "zstd", "identity", "compress", "gzip, gzip", "x-unknown", "", " GZIP ",
             "deflate, gzip", "*"]
SKIP_BODY = {b"HEAD"}  # no body comes back, by HTTP


# JSON values: scalars of every kind (huge ints, floats at the edges, unicode), nested a few levels.
json_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 1.5, -0.0, 1e308, 5e-324]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40), st.sampled_from(["", "tiny", "\u202e", "\x00", "\ufeff", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "a" * 5000]),
)
json_values = st.recursive(json_scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=12), kids, max_size=4)), max_leaves=12)

FIELDS = ["model", "messages", "prompt", "stream", "max_tokens", "max_completion_tokens", "n", "temperature",
          "top_p", "stream_options", "tools", "user", "input", "instructions", "max_output_tokens",
          "encoding_format", "dimensions", "previous_response_id", "system", "tokens", "store", "query",
          "documents", "top_n", "text_1", "text_2", "queries", "token_ids", "sampling_params", "texts", "inputs",
          "images", "truncate", "items", "label_token_ids", "item_first", "add_special_tokens", "cache_salt",
          "strict_tools", "tool_choice", "chat_template_kwargs"]


def mostly(draw, usual: st.SearchStrategy, odd: st.SearchStrategy, odds: int = 4):
    """``odd`` one time in ``odds``, else ``usual``: most cases stay valid HTTP where they are not
    the point, or the parser refuses nearly everything before the router sees it."""
    return draw(odd if draw(st.sampled_from(range(odds))) == odds - 1 else usual)  # shrinks to usual


@st.composite
def mutated_request(draw, valid: dict | None = None) -> bytes:
    """A valid request (for ``valid``'s route, else either) with, half the time, up to three
    fields set to junk, deleted, or a junk message."""
    base = valid or draw(st.sampled_from(list(VALID.values())))
    body = dict(base)
    if base not in (VALID_EMBEDDING, VALID_TOKENIZE, VALID_DETOKENIZE, VALID_RERANK, VALID_SCORE, VALID_CHAT_BATCH,
                    VALID_COHERE_EMBED) or \
            draw(st.integers(0, 3)) == 0:  # the APIs that generate nothing refuse any stream
        body["stream"] = draw(st.booleans())
    for _ in range(mostly(draw, st.just(0), st.integers(1, 3), odds=2)):
        name = draw(st.sampled_from(FIELDS))
        action = draw(st.sampled_from(["set", "delete", "message"]))
        if action == "delete":
            body.pop(name, None)
        elif action == "message":
            body["messages"] = [draw(st.one_of(
                st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool", "nope", ""]),
                                       "content": json_values}),
                json_values))]
        else:
            body[name] = draw(json_values)
    return orjson.dumps(body)


# Bodies that are JSON text orjson refuses, or accepts at its edges: non-finite and huge
# numbers, lone surrogates, nesting past its depth limit, trailing garbage, other encodings.
RAW_JSONISH = [
    b'{"model":"tiny","messages":[{"role":"user","content":"x"}],"max_tokens":1e999}',
    b'{"model":"tiny","messages":[{"role":"user","content":"x"}],"max_tokens":99999999999999999999999}',
    b'{"model":"tiny","messages":[{"role":"user","content":"x"}],"temperature":NaN}',
    b'{"model":"tiny","messages":[{"role":"user","content":"\\ud800"}]}',
    b'{"model":"tiny","messages":[{"role":"user","content":"\xff\xfe"}]}',
    b'{"model":"tiny","messages":[{"role":"user","content":"x"}]} trailing',
    b'{"model":"tiny","model":"other","prompt":"x"}',
    b'{"model":"tiny","prompt":[[1,2],[3,"x"]]}',
    b'{"model":"tiny","prompt":[-1, 99999999999]}',
    b'{"model":"tiny","prompt":[]}',
    b'[' * 1100 + b']' * 1100,
    b'{"a":' * 600 + b'1' + b'}' * 600,
    b'{"model":"tiny","messages":' + b'[' * 500 + b']' * 500 + b'}',
    "{\"model\":\"tiny\",\"prompt\":\"caf\u00e9\"}".encode("utf-16"),
    b'\xef\xbb\xbf{"model":"tiny","prompt":"bom"}',
    b"", b"null", b"0", b'"str"', b"{}", b"[]",
    b'{"model":"tiny","prompt":"' + b"x" * 20000 + b'"}',  # over server.max_body_bytes below
]

bodies = st.one_of(
    mutated_request(),
    json_values.map(orjson.dumps),
    st.sampled_from(RAW_JSONISH),
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
)

header_values = st.one_of(
    st.sampled_from([b"", b"tiny", b"session-1", b"\xff\xfe-x", "s\u00e9ance".encode(), b"ok\x01ctrl", b"a\tb",
                     b"a" * 9000, b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                     b"Bearer " + KEY.encode(), b"Bearer " + ADMIN.encode(), b"Bearer", b"Basic Zm9vOmJhcg==",
                     b"application/json", b"text/plain", b"multipart/form-data; boundary=x"]),
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.text(max_size=60).map(lambda s: s.replace("\r", "").replace("\n", "").encode("utf-8", "surrogatepass")),
)
# What well-behaved clients send.
PLAIN_HEADERS = [[], [(b"x-kvroute-session", b"s-1")], [(b"x-kvroute-session", b"s-2")],
                 [(b"x-kvroute-agent", b"agent-7"), (b"x-kvroute-feature", b"f")],
                 [(b"Content-Type", b"application/json"), (b"Accept", b"text/event-stream")]]
headers = st.lists(st.tuples(st.sampled_from(HEADER_NAMES).map(str.encode), header_values), max_size=5)


@st.composite
def cases(draw, paths: list[str] | None = None) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]:
    """A request to any path, most of them to the five main APIs; or to one of ``paths``."""
    method = mostly(draw, st.just("POST"), st.one_of(
        st.sampled_from(METHODS), st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ-_", min_size=1, max_size=12)), odds=6).encode()
    path = draw(st.sampled_from(paths)) if paths else mostly(draw, st.sampled_from(PATHS[:5]), st.one_of(
        st.sampled_from(PATHS),
        st.tuples(st.sampled_from(PATHS), st.text(max_size=20)).map(lambda t: t[0] + "?" + t[1]),
        st.text(max_size=30).map(lambda s: "/" + s),
    ), odds=5)
    path = path.encode("utf-8", "surrogatepass")
    hdrs = mostly(draw, st.sampled_from(PLAIN_HEADERS), headers, odds=3)
    if draw(st.integers(0, 7)):  # most cases carry the tenant's key, so they get past governance
        hdrs = [(b"Authorization", b"Bearer " + KEY.encode()), *hdrs]
    route = max((p for p in VALID if path.startswith(p.encode())), key=len, default=None)  # the longest: a batch's
    valid = VALID[route] if route is not None else VALID_CHAT
    body = mostly(draw, mutated_request(valid), bodies, odds=3)
    encoding = mostly(draw, st.none(), st.sampled_from(ENCODINGS), odds=6)
    if encoding is not None:
        if draw(st.booleans()) and encoding.strip().lower() in ("gzip", "deflate"):
            body = gzip.compress(body) if "gzip" in encoding.lower() else zlib.compress(body)
        hdrs.append((b"Content-Encoding", encoding.encode()))
    return method, path, hdrs, body


async def request(port: int, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]],
                  body: bytes) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 request on its own connection; the status, headers (lower-cased) and
    body (de-chunked) of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = [method + b" " + path + b" HTTP/1.1", b"Host: router", b"Content-Length: %d" % len(body),
                b"Connection: close", *(k + b": " + v for k, v in headers)]
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 15)  # a hang fails the test, not the suite
    finally:
        writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    head_text, _, payload = rest.partition(b"\r\n\r\n")
    fields = {}
    for line in head_text.split(b"\r\n"):
        name, _, value = line.decode("latin-1").partition(":")
        fields[name.strip().lower()] = value.strip()
    if fields.get("transfer-encoding") == "chunked":
        payload = dechunk(payload)
    return int(status_line.split()[1]), fields, payload


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


def assert_openai_error(fields: dict[str, str], payload: bytes) -> None:
    assert fields.get("content-type", "").startswith("application/json"), (fields, payload[:300])
    err = orjson.loads(payload)["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]


@pytest.fixture(params=["approximate", "exact"])
async def port(request, aiohttp_server):
    """The router in approximate mode (no tokenizer), or exact with the tiny model's tokenizer
    and chat template (junk messages and tools reach the template there)."""
    upstream = await aiohttp_server(fake_worker())
    model = {"name": "tiny", "workers": [str(upstream.make_url("")).rstrip("/")], "policy": "prefix"}
    if request.param == "exact":
        model["tokenizer"] = str(request.getfixturevalue("tiny_model_dir"))
    cfg = config_from_dict({
        "models": [model],
        "server": {"max_body_bytes": 16384},  # small, so that some bodies are over it
        "health": {"interval_s": 60},
        "governance": {"tenants": [{"name": "acme", "keys": [KEY]}], "admin_keys": [ADMIN],
                       "budgets": [{"name": "per-call", "scope": "request", "limit": {"tokens": 100000}}]},
    })
    server = RouterServer(create_app(cfg))
    await server.start_server()
    yield server.port
    await server.close()


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(case=cases())
# What this fuzz found, kept: a completion with junk 'messages' was a 500 (router/prefix.py read
# them), and a non-ASCII Content-Encoding was echoed into an error body that was not UTF-8.
@example(case=(b"POST", b"/v1/completions", [(b"Authorization", b"Bearer " + KEY.encode())],
               b'{"model":"tiny","prompt":"hello","max_tokens":3,"messages":[null]}'))
@example(case=(b"POST", b"/v1/completions", [(b"Authorization", b"Bearer " + KEY.encode())],
               b'{"model":"tiny","prompt":"hello","messages":"junk"}'))
@example(case=(b"POST", b"/v1/chat/completions", [(b"Authorization", b"Bearer " + KEY.encode()),
                                                   (b"Content-Encoding", b"\xff\xfe-x")], orjson.dumps(VALID_CHAT)))
async def test_no_input_gets_a_5xx_or_a_non_openai_error(port, case, caplog):
    await answered_below_500(port, case, caplog)


async def answered_below_500(port: int, case: tuple, caplog) -> None:
    """``case`` answered below 500, with an OpenAI error body when refused, and nothing logged
    as an error."""
    method, path, hdrs, body = case
    caplog.clear()  # one fixture serves every example
    with caplog.at_level(logging.ERROR, logger="kvroute"):
        status, fields, payload = await request(port, method, path, hdrs, body)
    event(f"HTTP {status}")  # the spread of answers, in --hypothesis-show-statistics
    assert status < 500, (status, payload[:500])
    if status >= 400 and method not in SKIP_BODY:
        assert_openai_error(fields, payload)
    crashes = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not crashes, crashes


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(case=cases(paths=list(VALID)[5:]))
async def test_no_input_to_vllms_other_apis_gets_a_5xx(port, case, caplog):
    """The same, for the APIs beyond chat, completions, embeddings, Responses and Messages:
    each reads fields of its own (token ids, items, Cohere's texts, batches)."""
    await answered_below_500(port, case, caplog)


async def test_the_router_still_serves_after_a_fuzz_burst(port):
    """Junk and valid requests at once, 50 in flight: every valid one is served."""
    junk = [(b"POST", b"/v1/chat/completions", [(b"Authorization", b"Bearer " + KEY.encode())], b)
            for b in RAW_JSONISH]
    good = [(b"POST", b"/v1/chat/completions", [(b"Authorization", b"Bearer " + KEY.encode())],
             # 30 users: one client's 30 identical prompts would be a loop (governance.session_id)
             orjson.dumps({**VALID_CHAT, "stream": i % 2 == 0, "user": f"user-{i}"})) for i in range(30)]
    answers = await asyncio.gather(*(request(port, *c) for c in junk + good))
    assert all(s < 500 for s, _, _ in answers)
    assert [s for s, _, _ in answers[len(junk):]] == [200] * len(good)
