"""A mock vLLM worker: a real aiohttp app on a real port, for fast unit tests of the proxy
and benchmarks of the router's own cost.

It answers like vLLM does (JSON bodies, SSE chunks with an optional usage chunk, /health,
/metrics). It is never the only proof: tests/integration runs the same paths on vLLM.

Faults a test sets per worker in ``app[FAULTS]`` (a dict, read on every completion request,
so a test may change it while the worker runs):

- ``status`` (and ``retry_after``): answer with this HTTP status, an OpenAI error body and
  that ``Retry-After`` header, as an overloaded or failing vLLM does;
- ``stall_s``: wait this long before the response headers;
- ``stall_first_event_s``: a stream sends its headers, then waits this long;
- ``stall_after_events`` and ``stall_mid_s``: a stream waits ``stall_mid_s`` after that
  many events (a worker that hangs mid-stream);
- ``delta_bytes``: a stream's first delta carries this many characters;
- ``event_bytes_after``: a stream's second event carries this many characters.

A stall ends early when the router closes the connection, so tests never wait it out.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

METRICS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 0.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 3.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{engine="0",model_name="tiny"} 1041.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",engine="0",num_gpu_blocks="256"} 1.0
"""


SEEN = web.AppKey("seen", list)
SEEN_HEADERS = web.AppKey("seen_headers", list)  # lower-cased x-kvroute-*, trace and request-id headers


SEEN_AUTH = web.AppKey("seen_auth", list)  # (path, Authorization header or None) of every call
FAULTS = web.AppKey("faults", dict)  # the fault knobs above
STORED = web.AppKey("stored", dict)  # Responses answers by id, as vLLM keeps them with its store on


async def stall(request: web.Request, seconds: float) -> None:
    """Wait ``seconds``, or until the peer closed the connection."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end and request.transport is not None and not request.transport.is_closing():
        await asyncio.sleep(0.005)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bare_worker(chat: Handler, *routes: tuple[str, str, Handler]) -> web.Application:
    """A worker with ``chat`` at ``/v1/chat/completions``, any other ``routes`` (method,
    path, handler), and a ``/health`` and ``/metrics`` that answer empty: for tests of how
    the router meets a worker, or what is in front of it, that misbehaves."""

    async def empty(request: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application()
    app.router.add_get("/health", empty)
    app.router.add_get("/metrics", empty)
    app.router.add_post("/v1/chat/completions", chat)
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return app


def fake_worker(name: str = "fake", api_key: str | None = None) -> web.Application:
    """``api_key``: answer /v1/ calls without ``Authorization: Bearer <key>`` with 401, as
    vLLM started with ``--api-key`` does."""

    @web.middleware
    async def check_key(request: web.Request, handler):
        auth = request.headers.get("Authorization")
        app[SEEN_AUTH].append((request.path, auth))
        if api_key and request.path.startswith("/v1/") and auth != f"Bearer {api_key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    app = web.Application(middlewares=[check_key])
    app[SEEN] = []
    app[SEEN_HEADERS] = []
    app[SEEN_AUTH] = []
    app[FAULTS] = {}
    app[STORED] = {}

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=METRICS)

    async def completion(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        app[SEEN].append(body)
        app[SEEN_HEADERS].append({k.lower(): v for k, v in request.headers.items()
                                  if k.lower().startswith(("x-kvroute-", "traceparent", "tracestate", "x-request-id"))})
        drop = body.get("drop_connection_once")
        if drop is not None and sum(b.get("drop_connection_once") == drop for b in app[SEEN]) == 1:
            request.transport.close()  # as a worker closing a keep-alive connection we reuse
            return web.Response()
        faults = app[FAULTS]
        if faults.get("stall_s"):
            await stall(request, faults["stall_s"])
            if request.transport is None or request.transport.is_closing():
                return web.Response()  # the router gave up on us
        if faults.get("status"):
            status, retry_after = faults["status"], faults.get("retry_after")
            return web.json_response({"object": "error", "message": f"fault: HTTP {status}",
                                      "type": "ServiceUnavailableError", "param": None, "code": status},
                                     status=status, headers={"Retry-After": retry_after} if retry_after else None)
        if body.get("model") == "reject-me" or body.get("temperature") == 99:
            return web.json_response({"object": "error", "message": "temperature too high",
                                      "type": "BadRequestError", "param": None, "code": 400}, status=400)
        usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14,
                 "prompt_tokens_details": {"cached_tokens": 5}}
        if body.get("fake_completion_tokens") is not None:
            return await fake_generation(request, body)
        if not body.get("stream"):
            return web.json_response({"id": "x", "object": "chat.completion", "model": body["model"],
                                      "choices": [{"index": 0, "message": {"role": "assistant",
                                                                           "content": f"hi from {name}"},
                                                   "finish_reason": "stop"}], "usage": usage})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        if faults.get("stall_first_event_s"):
            await stall(request, faults["stall_first_event_s"])
        words = ["hi", " from", f" {name}"]
        if faults.get("delta_bytes"):
            words[0] = "x" * faults["delta_bytes"]
        if faults.get("event_bytes_after"):
            words[1] = "y" * faults["event_bytes_after"]
        for i, word in enumerate(words):
            if i == faults.get("stall_after_events"):
                await stall(request, faults.get("stall_mid_s", 0))
            if request.transport is None or request.transport.is_closing():
                return resp  # the router gave up on us
            chunk = {"id": "x", "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await asyncio.sleep(0.01)
            if body.get("die_mid_stream"):
                request.transport.close()
                return resp
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(b"data: " + orjson.dumps({"id": "x", "choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def embeddings(request: web.Request) -> web.Response:
        body = await request.json()
        app[SEEN].append({**body, "path": request.path})
        given = body.get("input", body.get("messages"))  # text, ids, or conversations
        if isinstance(given, list) and given and isinstance(given[0], dict):
            given = [given]  # one conversation
        inputs = given if isinstance(given, list) and not isinstance(given[0], int) else [given]
        data = [{"index": i, "object": "embedding", "embedding": [float(len(str(x))), 0.5, -0.5]}
                for i, x in enumerate(inputs)]
        tokens = sum(len(str(x)) // 4 + 1 for x in inputs)
        return web.json_response({"id": "embd-x", "object": "list", "created": 0, "model": body["model"],
                                  "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                                                          "completion_tokens": 0}})

    async def cohere_embed(request: web.Request) -> web.Response:
        """Cohere's embed API: its texts' vectors by type, the input tokens billed in 'meta'."""
        body = await request.json()
        app[SEEN].append({**body, "path": request.path})
        texts = body.get("texts") or body.get("images") or body.get("inputs") or []
        tokens = sum(len(str(t)) // 4 + 1 for t in texts)
        return web.json_response({"id": "embd-x", "response_type": "embeddings_by_type",
                                  "embeddings": {"float": [[float(len(str(t))), 0.5] for t in texts]},
                                  "texts": body.get("texts"),
                                  "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": tokens}}})

    async def responses(request: web.Request) -> web.StreamResponse:
        """OpenAI's Responses API as vLLM answers it: one message of ``fake_output_tokens``
        words (default 3, at most ``max_output_tokens``), whole or as events that end with
        ``response.completed``. Each is stored unless ``store`` is false, and a follow-up
        naming one it does not hold (``previous_response_id``) is a 404, as in vLLM."""
        body = await request.json()
        app[SEEN].append({**body, "path": request.path})
        previous = body.get("previous_response_id")
        if previous is not None and previous not in app[STORED]:
            return not_found(previous)
        n = body.get("fake_output_tokens", 3)
        if not body.get("fake_ignore_max_output_tokens"):  # a worker that overruns, for governance tests
            n = min(n, body.get("max_output_tokens") or n)
        text = " ".join(["word"] * n)
        usage = {"input_tokens": 20, "input_tokens_details": {"cached_tokens": 8}, "output_tokens": n,
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 20 + n}
        item = {"id": "msg_x", "type": "message", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}
        done = {"id": f"resp_{uuid.uuid4().hex}", "object": "response", "model": body["model"],
                "status": "completed", "output": [item], "usage": usage, "previous_response_id": previous}
        if body.get("store", True):
            app[STORED][done["id"]] = done
        if not body.get("stream"):
            return web.json_response(done)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        seq = 0

        async def event(kind: str, **data) -> None:
            nonlocal seq
            await resp.write(f"event: {kind}\n".encode() + b"data: "
                             + orjson.dumps({**data, "type": kind, "sequence_number": seq}) + b"\n\n")
            seq += 1

        await event("response.created", response={**done, "status": "in_progress", "output": [], "usage": None})
        for _ in range(n):
            await event("response.output_text.delta", item_id="msg_x", output_index=0, content_index=0,
                        delta="word ")
        await event("response.completed", response=done)
        return resp

    def not_found(response_id: str) -> web.Response:
        return web.json_response({"error": {"message": f"Response with id '{response_id}' not found.",
                                            "type": "invalid_request_error", "param": "response_id",
                                            "code": 404}}, status=404)

    async def stored_response(request: web.Request) -> web.Response:
        response_id = request.match_info["id"]
        app[SEEN].append({"path": request.path, "method": request.method})
        if response_id not in app[STORED]:
            return not_found(response_id)
        if request.path.endswith("/cancel"):  # all of them are done: vLLM's answer
            return web.json_response({"error": {"message": "Cannot cancel a synchronous response.",
                                                "type": "invalid_request_error", "param": "response_id",
                                                "code": 400}}, status=400)
        if request.query.get("stream") == "true":  # replayed as events, as vLLM does for background ones
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            for kind in ("response.created", "response.completed"):
                await resp.write(f"event: {kind}\ndata: ".encode()
                                 + orjson.dumps({"type": kind, "response": app[STORED][response_id]}) + b"\n\n")
            return resp
        return web.json_response(app[STORED][response_id])

    async def anthropic_messages(request: web.Request) -> web.StreamResponse:
        """Anthropic's Messages API as vLLM answers it: ``fake_output_tokens`` words (default 3,
        at most ``max_tokens`` unless ``fake_ignore_max_tokens``), whole or as named events."""
        body = await request.json()
        app[SEEN].append({**body, "path": request.path})
        n = body.get("fake_output_tokens", 3)
        if not body.get("fake_ignore_max_tokens"):
            n = min(n, body.get("max_tokens") or n)
        usage = {"input_tokens": 12, "output_tokens": n, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 8}
        stop = "max_tokens" if n == body.get("max_tokens") else "end_turn"
        if not body.get("stream"):
            return web.json_response({"id": "msg_x", "type": "message", "role": "assistant", "model": body["model"],
                                      "content": [{"type": "text", "text": " ".join(["word"] * n)}],
                                      "stop_reason": stop, "usage": usage})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        async def event(kind: str, **data) -> None:
            await resp.write(f"event: {kind}\n".encode() + b"data: " + orjson.dumps({"type": kind, **data}) + b"\n\n")

        await event("message_start", message={"id": "msg_x", "type": "message", "role": "assistant", "content": [],
                                              "model": body["model"], "stop_reason": None,
                                              "usage": {"input_tokens": 12, "output_tokens": 0}})
        await event("content_block_start", index=0, content_block={"type": "text", "text": ""})
        for i in range(n):
            await event("content_block_delta", index=0, delta={"type": "text_delta", "text": "word" if i == 0
                                                                else " word"})
        await event("content_block_stop", index=0)
        await event("message_delta", delta={"stop_reason": stop, "stop_sequence": None}, usage=usage)
        await event("message_stop")
        return resp

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    async def count_tokens(request: web.Request) -> web.Response:
        body = await request.json()
        app[SEEN].append({**body, "path": request.path})
        return web.json_response({"input_tokens": len(orjson.dumps(body["messages"])) // 4})

    async def tokenize(request: web.Request) -> web.Response:
        """One token per byte of the prompt (or of the messages' JSON)."""
        body = await request.json()
        app[SEEN].append({**body, "path": request.path})
        text = body["prompt"] if "prompt" in body else orjson.dumps(body["messages"]).decode()
        ids = list(text.encode())
        return web.json_response({"count": len(ids), "max_model_len": 2048, "tokens": ids})

    async def detokenize(request: web.Request) -> web.Response:
        body = await request.json()
        app[SEEN].append({**body, "path": request.path})
        return web.json_response({"prompt": bytes(t % 256 for t in body["tokens"]).decode(errors="replace")})

    async def scores(request: web.Request) -> web.Response:
        """vLLM's /score and /rerank on an embedding model: each document scored against the
        query; here by shared characters."""
        body = await request.json()
        app[SEEN].append({**body, "path": request.path})
        query = body.get("query", body.get("text_1"))
        docs = body.get("documents", body.get("text_2"))
        docs = docs if isinstance(docs, list) else [docs]
        score = [len(set(str(query)) & set(str(d))) / 100 for d in docs]
        usage = {"prompt_tokens": sum(len(str(d)) // 4 + 1 for d in [query, *docs]), "completion_tokens": 0}
        usage["total_tokens"] = usage["prompt_tokens"]
        if request.path == "/score":
            return web.json_response({"id": "score-x", "object": "list", "model": body["model"], "usage": usage,
                                      "data": [{"index": i, "object": "score", "score": v}
                                               for i, v in enumerate(score)]})
        ranked = sorted(range(len(docs)), key=lambda i: -score[i])[:body.get("top_n") or None]
        return web.json_response({"id": "rerank-x", "model": body["model"], "usage": usage, "results": [
            {"index": i, "document": {"text": docs[i]}, "relevance_score": score[i]} for i in ranked]})

    async def pooled(request: web.Request) -> web.Response:
        """vLLM's /classify (two labels) and /pooling (the raw scores) on a classification
        model: one row per input text (or one for a conversation), here by its length."""
        body = await request.json()
        app[SEEN].append({**body, "path": request.path})
        given = body.get("input", body.get("messages"))
        texts = [str(given)] if "messages" in body or not isinstance(given, list) or isinstance(given[0], int) \
            else [str(x) for x in given]
        probs = [[1 / (2 + len(t) % 3), 1 - 1 / (2 + len(t) % 3)] for t in texts]
        tokens = sum(len(t) // 4 + 1 for t in texts)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}
        if request.path == "/classify":
            data = [{"index": i, "label": "yes" if p[1] > p[0] else "no", "probs": p, "num_classes": 2}
                    for i, p in enumerate(probs)]
        else:
            data = [{"index": i, "object": "pooling", "data": p} for i, p in enumerate(probs)]
        return web.json_response({"id": f"{request.path[1:]}-x", "object": "list", "created": 0,
                                  "model": body["model"], "data": data, "usage": usage})

    async def generate(request: web.Request) -> web.StreamResponse:
        """vLLM's token-in API: ``sampling_params.max_tokens`` (default 3) token ids for each of
        ``sampling_params.n`` choices, or ``fake_completion_tokens`` whatever max_tokens says."""
        body = await request.json()
        app[SEEN].append(body)
        params = body["sampling_params"]
        n, choices = body.get("fake_completion_tokens") or params.get("max_tokens") or 3, params.get("n") or 1
        usage = {"prompt_tokens": len(body["token_ids"]), "completion_tokens": n * choices,
                 "total_tokens": len(body["token_ids"]) + n * choices, "prompt_tokens_details": {"cached_tokens": 0}}
        if not body.get("stream"):
            return web.json_response({"request_id": "x", "model": body["model"], "usage": usage, "choices": [
                {"index": c, "finish_reason": "length", "token_ids": [7] * n} for c in range(choices)]})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for _ in range(n):
                for c in range(choices):
                    chunk = {"request_id": "x", "usage": None, "choices": [{"index": c, "token_ids": [7]}]}
                    await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            if (body.get("stream_options") or {}).get("include_usage"):
                await resp.write(b"data: " + orjson.dumps({"request_id": "x", "choices": [], "usage": usage}) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, ConnectionError):
            pass  # the router cut the stream
        return resp

    async def chat_batch(request: web.Request) -> web.Response:
        """vLLM's batch of conversations: one choice each, their usage summed."""
        body = await request.json()
        app[SEEN].append({**body, "path": request.path})
        each = body.get("max_completion_tokens") or body.get("max_tokens") or 3
        conversations = body["messages"]
        usage = {"prompt_tokens": 11 * len(conversations), "completion_tokens": each * len(conversations),
                 "total_tokens": (11 + each) * len(conversations)}
        return web.json_response({"id": "x", "object": "chat.completion", "model": body["model"], "usage": usage,
                                  "choices": [{"index": i, "message": {"role": "assistant", "content": "x" * each},
                                               "finish_reason": "length"} for i in range(len(conversations))]})

    async def cohere_chat(request: web.Request) -> web.StreamResponse:
        """Cohere's chat API as vLLM answers it: ``fake_output_tokens`` words (default 3, at
        most ``max_tokens`` unless ``fake_ignore_max_tokens``), whole or as Cohere's events,
        the usage in ``message-end``, its counts written as floats."""
        body = await request.json()
        app[SEEN].append({**body, "path": request.path})
        n = body.get("fake_output_tokens", 3)
        if body.get("max_tokens") and not body.get("fake_ignore_max_tokens"):
            n = min(n, body["max_tokens"])
        prompt = float(sum(len(str(m.get("content"))) // 4 + 1 for m in body["messages"]))
        usage = {"billed_units": {"input_tokens": prompt, "output_tokens": float(n)},
                 "tokens": {"input_tokens": prompt, "output_tokens": float(n)}, "cached_tokens": 0.0}
        if not body.get("stream"):
            return web.json_response({"id": "x", "finish_reason": "MAX_TOKENS", "usage": usage, "message": {
                "role": "assistant", "content": [{"type": "text", "text": " x" * n}]}})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        async def event(**data) -> None:
            await resp.write(b"data: " + orjson.dumps(data) + b"\n\n")

        try:
            await event(id="x", delta={"message": {"role": "assistant"}}, type="message-start")
            await event(index=0, delta={"message": {"content": {"text": "", "type": "text"}}}, type="content-start")
            for _ in range(n):
                await event(index=0, delta={"message": {"content": {"text": " x"}}}, type="content-delta")
            await event(index=0, type="content-end")
            await event(id="x", delta={"finish_reason": "MAX_TOKENS", "usage": usage}, type="message-end")
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, ConnectionError):
            pass  # the router cut the stream
        return resp

    async def generative_scoring(request: web.Request) -> web.Response:
        """vLLM's generative scoring: a score per item, one token generated for each, the
        prompt tokens of every query + item counted (text at 4 characters a token)."""
        body = await request.json()
        app[SEEN].append({**body, "path": request.path})

        def tokens(x: str | list) -> int:
            return len(x) // 4 + 1 if isinstance(x, str) else len(x)

        items = body["items"]
        prompt = sum(tokens(body["query"]) + tokens(i) for i in items)
        return web.json_response({"id": "generative-scoring-x", "object": "list", "created": 0, "model": body["model"],
                                  "data": [{"index": i, "object": "score", "score": 0.5} for i in range(len(items))],
                                  "usage": {"prompt_tokens": prompt, "completion_tokens": len(items),
                                            "total_tokens": prompt + len(items)}})

    async def render(request: web.Request) -> web.Response:
        """vLLM's renders: the token-in API's body; a completion's, one per prompt."""
        body = await request.json()
        app[SEEN].append({**body, "path": request.path})
        rendered = {"token_ids": list(range(1, 41)), "model": body["model"], "stream": body.get("stream", False),
                    "sampling_params": {"max_tokens": body.get("max_tokens", 16)}}
        prompt = body.get("prompt")
        if request.path == "/v1/completions/render":
            return web.json_response([rendered] * (len(prompt) if isinstance(prompt, list) else 1))
        return web.json_response(rendered)

    for path in ("/v1/chat/completions/render", "/v1/completions/render", "/v1/messages/render",
                 "/v1/responses/render", "/cohere/v2/chat/render"):
        app.router.add_post(path, render)
    app.router.add_post("/inference/v1/generate", generate)
    app.router.add_post("/v1/chat/completions/batch", chat_batch)
    app.router.add_post("/generative_scoring", generative_scoring)
    app.router.add_post("/cohere/v2/chat", cohere_chat)
    app.router.add_post("/classify", pooled)
    app.router.add_post("/pooling", pooled)
    app.router.add_post("/score", scores)
    app.router.add_post("/rerank", scores)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_post("/v1/messages", anthropic_messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_post("/v1/chat/completions", completion)
    app.router.add_post("/v1/completions", completion)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v2/embed", cohere_embed)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/responses/{id}", stored_response)
    app.router.add_post("/v1/responses/{id}/cancel", stored_response)
    return app


async def fake_generation(request: web.Request, body: dict) -> web.StreamResponse:
    """Opt-in, for governance tests: ``fake_completion_tokens`` tokens (one SSE chunk each),
    ``fake_prompt_tokens`` in usage (default 11), ``fake_honor_max_tokens`` to stop at
    max_tokens like vLLM, ``fake_tool_call`` (a tool name) to answer with a tool call, and
    ``fake_chunk_delay_s`` between chunks (a slow stream)."""
    n = int(body["fake_completion_tokens"])
    if body.get("fake_honor_max_tokens"):
        n = min(n, body.get("max_completion_tokens") or body.get("max_tokens") or n)
    choices = body.get("n") or 1  # n tokens for each choice
    prompt = int(body.get("fake_prompt_tokens", 11))
    usage = {"prompt_tokens": prompt, "completion_tokens": n * choices, "total_tokens": prompt + n * choices,
             "prompt_tokens_details": {"cached_tokens": 0}}
    tool = body.get("fake_tool_call")
    call = {"id": "call_1", "type": "function", "function": {"name": tool, "arguments": "{}"}} if tool else None
    if not body.get("stream"):
        message = {"role": "assistant", "content": "x" * n}
        if call:
            message["tool_calls"] = [call]
        return web.json_response({"id": "x", "object": "chat.completion", "model": body["model"],
                                  "choices": [{"index": c, "message": message,
                                               "finish_reason": "tool_calls" if call else "stop"}
                                              for c in range(choices)],
                                  "usage": usage})
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    delay = float(body.get("fake_chunk_delay_s", 0))
    try:
        for i in range(n):
            delta = {"content": "x"} if not (call and i == 0) else {"tool_calls": [{"index": 0, **call}]}
            for c in range(choices):  # vLLM sends each choice's delta in an event of its own
                chunk = {"id": "x", "object": "chat.completion.chunk",
                         "choices": [{"index": c, "delta": delta, "finish_reason": None}]}
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            if delay:
                await asyncio.sleep(delay)
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(b"data: " + orjson.dumps({"id": "x", "choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
    except (ConnectionResetError, ConnectionError):
        pass  # the router stopped reading (a cut stream or a client that left)
    return resp
