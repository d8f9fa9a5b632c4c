"""A fake vLLM worker: a real aiohttp app on a real port, for fast unit tests of the proxy.

It answers like vLLM does (JSON bodies, SSE chunks with an optional usage chunk, /health,
/metrics). It is never the only proof: tests/integration runs the same paths on vLLM.
"""

from __future__ import annotations

import asyncio

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


def fake_worker(name: str = "fake") -> web.Application:
    app = web.Application()
    app[SEEN] = []

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=METRICS)

    async def completion(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        app[SEEN].append(body)
        if body.get("model") == "reject-me" or body.get("temperature") == 99:
            return web.json_response({"object": "error", "message": "temperature too high",
                                      "type": "BadRequestError", "param": None, "code": 400}, status=400)
        usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14,
                 "prompt_tokens_details": {"cached_tokens": 5}}
        if not body.get("stream"):
            return web.json_response({"id": "x", "object": "chat.completion", "model": body["model"],
                                      "choices": [{"index": 0, "message": {"role": "assistant",
                                                                           "content": f"hi from {name}"},
                                                   "finish_reason": "stop"}], "usage": usage})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for word in ("hi", " from", f" {name}"):
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

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/chat/completions", completion)
    app.router.add_post("/v1/completions", completion)
    return app
