"""Cascade escalation: try the cheap tier, keep its answer when confident, else escalate.

For a tiered model with ``mode: cascade``, the handler calls ``run`` here instead of
``pipeline.run_request``; every try goes through the pipeline's ``attempt``::

    classifier score (if configured) -> band: strong only | cheap only | cascade
    cascade: try tier 0 (non-streaming, internally) -> confidence -> keep, or try tier 1 with
             the ORIGINAL request -> ... -> the last tier's answer is final

Confidence is ``router/confidence.py``'s rules (cut off, empty, refusal, user verifiers,
logprobs when asked for) and then the answer scorer (``classifier/answer.py``); an answer
is kept when confidence >= ``threshold``. A cheap try that fails (worker error, no healthy
worker) escalates; a failing last tier is the client's error, as without a cascade.

Streaming (``stream_policy``):
- ``buffer`` (default): the cheap answer is generated whole, then re-emitted as SSE if kept;
  otherwise the last tier streams as usual. TTFT = the cheap try's full latency (+ the
  strong tier's TTFT when escalating).
- ``first_tokens``: a probe of ``first_tokens`` tokens from the cheap tier decides; the
  chosen tier then streams the ORIGINAL request (a kept cheap answer is regenerated: the
  probe's prompt is in the prefix cache, its tokens are paid twice and counted as wasted).
  TTFT = the probe's latency + the chosen tier's TTFT.

Accounting: every try is a normal proxied request (per-worker token metrics, governance
grant of its own, settled to its own usage at its tier's price); the response's ``usage``
is the sum over tries; ``x-kvroute-tier`` names the final tier, ``x-kvroute-escalated``
says whether it escalated. Metrics: ``kvroute_cascade_escalations_total{model,from,to}``,
``kvroute_cascade_wasted_tokens_total{model}``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace

import aiohttp
import orjson
from aiohttp import web

from kvroute.router import keys
from kvroute.router.confidence import Answer, AnswerJudge, parse_answer
from kvroute.router.errors import BudgetExceeded, NoHealthyWorker, UpstreamError
from kvroute.router.governance.grant import Grant
from kvroute.router.pipeline import attempt
from kvroute.router.proxy import TIER_HEADER, WORKER_HEADER, add_usage
from kvroute.router.requests import CHAT, ParsedRequest
from kvroute.router.routes import ModelRoute, ServedModel
from kvroute.router.tiers import prompt_text

log = logging.getLogger(__name__)
ESCALATED_HEADER = "x-kvroute-escalated"
TRY_ERRORS = (UpstreamError, NoHealthyWorker)  # a cheap try failing this way escalates


async def run(request: web.Request, req: ParsedRequest, served: ServedModel) -> web.StreamResponse:
    """A ``mode: cascade`` model: the classifier's band, then the cheap try and escalation."""
    judge = served.judge
    assert judge is not None  # handlers send only cascade models here
    walk = Walk(judge, request, served)
    record = walk.record
    if served.chooser is not None:
        _, score = await served.chooser.choose(prompt_text(req.body))
        lo, hi = judge.cfg.band
        if score >= hi:  # the classifier is sure the strong tier is needed: no cheap try
            if record is not None:
                record.on_tier(served.tiers[-1].cfg.tier, score, "band")
                record.on_cascade(False, None, None, None)
            return await walk.final(served.tiers[-1], req)
        if score < lo:  # sure the cheap tier will do: no check either
            if record is not None:
                record.on_tier(served.tiers[0].cfg.tier, score, "band")
                record.on_cascade(False, None, None, None)
            return await walk.final(served.tiers[0], req)
        if record is not None:
            record.on_tier(served.tiers[0].cfg.tier, score, "cascade")
    return await walk.cascade(req)


class Walk:
    """One request's walk through the tiers: its first grant, wasted usage and the answer kept so far."""

    def __init__(self, judge: AnswerJudge, request: web.Request, served: ServedModel):
        self.judge, self.request, self.served = judge, request, served
        self.metrics = request.app[keys.METRICS]
        self.record = request.get(keys.RECORD)  # telemetry: escalations and the cheap answer's confidence
        self.first: Grant | None = None
        self.spent: dict | None = None  # usage of earlier tries, added to the final response's

    async def _send(self, route: ModelRoute, req: ParsedRequest, **options) -> tuple[web.StreamResponse, dict | None]:
        """One try through the pipeline's ``attempt``: governed, proxied, accounted, settled.

        Later tries reserve again at their own tier's price; a budget that would move an
        escalation back down refuses it (there is no point in that try)."""
        done = await attempt(self.request, self.served, route, req, after=self.first,
                             may_downgrade=self.first is None, **options)
        if self.first is None:
            self.first = done.grant
        return done.response, done.usage

    async def final(self, route: ModelRoute, req: ParsedRequest, escalated: bool = False) -> web.StreamResponse:
        """The last try: streamed or returned to the client as usual, with the cascade's headers and usage."""
        if self.first is not None:  # later tries reserve against the (governed) original request
            req = replace(req, body=self.first.req.body)
        resp, _ = await self._send(route, req, extra_headers={ESCALATED_HEADER: str(escalated).lower()},
                                   usage_add=self.spent)
        if isinstance(resp, web.Response):  # a stream got usage_add in the relay instead
            self._add_spent(resp)
        return resp

    def _add_spent(self, resp: web.Response) -> None:
        """Report the sum over tries in a whole JSON response's ``usage``."""
        if self.spent and resp.body is not None:
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
                body = orjson.loads(resp.body)  # type: ignore[arg-type]
                body["usage"] = add_usage(self.spent, body.get("usage"))
                resp.body = orjson.dumps(body)

    async def cascade(self, req: ParsedRequest) -> web.StreamResponse:
        tiers = self.served.tiers
        probe = req.stream and self.judge.cfg.stream_policy == "first_tokens"
        question = prompt_text(req.body)
        for i, route in enumerate(tiers[:-1]):
            resp, usage, answer = await self._cheap(route, req, probe)
            verdict = await self.judge.confidence(question, answer, probe)
            kept = verdict.confidence >= self.judge.cfg.threshold
            if self.record is not None:
                self.record.on_cascade(not kept, None if kept else route.cfg.tier,
                                       None if kept else tiers[i + 1].cfg.tier, verdict.confidence)
            if kept and not probe and resp is not None:
                return await self._emit(resp, req)
            if kept:  # the probe said yes: the cheap tier streams the original request
                self._spend(usage)
                self.metrics.cascade_wasted_tokens.labels(self.served.name).inc(_tokens(usage))
                return await self.final(route, req)
            nxt = tiers[i + 1]
            log.debug("cascade %s: escalating %s -> %s (%s, confidence %.3f)", self.served.name,
                      route.cfg.tier, nxt.cfg.tier, verdict.reason, verdict.confidence)
            before = self.spent
            self._spend(usage)
            if i + 1 < len(tiers) - 1:
                self._escalated(route, nxt, usage)
                continue
            refused = False
            try:
                return await self.final(nxt, req, escalated=True)
            except BudgetExceeded:
                if resp is None:
                    raise
                refused, self.spent = True, before
            finally:
                if not refused:
                    self._escalated(route, nxt, usage)
            log.info("cascade %s: escalation refused by a budget; keeping the %s answer", self.served.name,
                     route.cfg.tier)
            return await self._emit(resp, req)
        raise AssertionError("unreachable: the loop returns at the last tier")

    async def _cheap(self, route: ModelRoute, req: ParsedRequest, probe: bool
                     ) -> tuple[web.Response | None, dict | None, Answer]:
        """The cheap try, whole and non-streaming (a probe: only ``first_tokens`` tokens)."""
        body = {k: v for k, v in req.body.items() if k != "stream_options"}
        body["stream"] = False
        inner = replace(req, body=body, stream=False, wants_usage_chunk=False)
        if probe:
            inner = inner.with_max_tokens(min(req.max_tokens or self.judge.cfg.first_tokens,
                                              self.judge.cfg.first_tokens))
        try:
            resp, usage = await self._send(route, inner)
        except TRY_ERRORS as exc:
            log.info("cascade %s: tier %s failed (%s), escalating", self.served.name, route.cfg.tier, exc.message)
            return None, None, Answer("", None, ok=False)
        assert isinstance(resp, web.Response)  # a non-streaming try answers whole
        try:
            parsed = orjson.loads(resp.body)  # type: ignore[arg-type]
        except (orjson.JSONDecodeError, TypeError):
            return resp, usage, Answer("", None, ok=False)
        return resp, usage, parse_answer(parsed)

    def _spend(self, usage: dict | None) -> None:
        """Remember an earlier try's usage: the final response reports the sum over tries."""
        if usage:
            self.spent = add_usage(self.spent, usage)

    def _escalated(self, frm: ModelRoute, to: ModelRoute, usage: dict | None) -> None:
        self.metrics.cascade_escalations.labels(self.served.name, frm.cfg.tier, to.cfg.tier).inc()
        self.metrics.cascade_wasted_tokens.labels(self.served.name).inc(_tokens(usage))

    async def _emit(self, resp: web.Response, req: ParsedRequest) -> web.StreamResponse:
        """The kept cheap answer: as is, or re-emitted as SSE to a streaming client."""
        resp.headers[ESCALATED_HEADER] = "false"
        self._add_spent(resp)  # earlier tries, e.g. a lower tier of three
        if not req.stream:
            return resp
        headers = {k: resp.headers[k] for k in (WORKER_HEADER, TIER_HEADER) if k in resp.headers}
        out = web.StreamResponse(status=200, headers={"content-type": "text/event-stream", "cache-control": "no-cache",
                                                      ESCALATED_HEADER: "false", **headers})
        await out.prepare(self.request)
        with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
            for event in to_sse(orjson.loads(resp.body), req.kind == CHAT, req.wants_usage_chunk):  # type: ignore[arg-type]
                await out.write(event)
            await out.write_eof()
        return out


def to_sse(body: dict, chat: bool, include_usage: bool) -> list[bytes]:
    """A whole chat/completion response as the SSE events a streaming worker would have sent."""
    base = {k: body[k] for k in ("id", "created", "model") if k in body}
    base["object"] = "chat.completion.chunk" if chat else "text_completion"
    events: list[dict] = []
    for ch in body.get("choices") or ():
        idx = ch.get("index", 0)
        if chat:
            msg = ch.get("message") or {}
            delta: dict = {"role": "assistant", "content": msg.get("content") or ""}
            if msg.get("tool_calls"):
                delta["tool_calls"] = [{"index": i, **tc} for i, tc in enumerate(msg["tool_calls"])]
            events.append({**base, "choices": [{"index": idx, "delta": delta, "logprobs": ch.get("logprobs"),
                                                "finish_reason": None}]})
            events.append({**base, "choices": [{"index": idx, "delta": {}, "finish_reason": ch.get("finish_reason")}]})
        else:
            events.append({**base, "choices": [{"index": idx, "text": ch.get("text") or "",
                                                "logprobs": ch.get("logprobs"),
                                                "finish_reason": ch.get("finish_reason")}]})
    if include_usage and body.get("usage"):
        events.append({**base, "choices": [], "usage": body["usage"]})
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def _tokens(usage: dict | None) -> int:
    counted = add_usage(None, usage)
    return counted["prompt_tokens"] + counted["completion_tokens"]
