"""Cascade escalation: try the cheap tier, keep its answer when confident, else escalate.

For a tiered model with ``mode: cascade``, ``pipeline.run_request`` hands the request here.
The stage is one straight line per request::

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

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from kvroute.router import keys
from kvroute.router.confidence import Answer, Verdict, logprob_stats, parse_answer, rules
from kvroute.router.config import CascadeConfig
from kvroute.router.errors import BudgetExceeded, ConfigError, NoHealthyWorker, UpstreamError
from kvroute.router.metrics import RouterMetrics
from kvroute.router.proxy import TIER_HEADER, WORKER_HEADER, add_usage
from kvroute.router.requests import CHAT, ParsedRequest
from kvroute.router.tiers import prompt_text

if TYPE_CHECKING:
    from kvroute.router.governance.governor import Grant
    from kvroute.router.pipeline import ModelRoute, ServedModel
    from kvroute.router.policies.base import RequestContext

log = logging.getLogger(__name__)
ESCALATED_HEADER = "x-kvroute-escalated"
Build = Callable[["ModelRoute", ParsedRequest], Awaitable["RequestContext"]]
Send = Callable[..., Awaitable[web.StreamResponse]]  # pipeline.forward_with_retry
TRY_ERRORS = (UpstreamError, NoHealthyWorker)  # a cheap try failing this way escalates


class Cascade:
    def __init__(self, model: str, cfg: CascadeConfig, executor: Executor | None, metrics: RouterMetrics):
        self.model, self.cfg, self.executor, self.metrics = model, cfg, executor, metrics
        self.scorer: Any = None  # classifier.answer.AnswerScorer; None: rules only

    async def load(self) -> None:
        if self.cfg.answer_model == "rules":
            return
        from kvroute.classifier.answer import load_answer_scorer  # torch and the encoder load only here

        try:
            self.scorer = await asyncio.get_running_loop().run_in_executor(
                self.executor, load_answer_scorer, self.cfg.answer_model)
        except Exception as exc:
            raise ConfigError(f"models[{self.model}].cascade.answer_model",
                              f"cannot load the answer scorer: {exc}") from exc
        log.info("model %s: cascade answer scorer %s loaded (threshold %s)", self.model, self.scorer.version,
                 self.cfg.threshold)

    async def confidence(self, question: str, answer: Answer, probe: bool = False) -> Verdict:
        if probe and answer.finish_reason == "length":  # a probe is cut off by design
            answer = replace(answer, finish_reason=None)
        verdict = rules(answer, self.cfg.verifiers, self.cfg.min_mean_logprob)
        if verdict is not None:
            return verdict
        signals = logprob_stats(answer.logprobs) if answer.logprobs else {}
        if self.scorer is None:
            return Verdict(1.0, "rules-only", signals)
        scores = await asyncio.get_running_loop().run_in_executor(
            self.executor, self.scorer.score, [question], [answer.text])
        return Verdict(float(scores[0]), "scorer", signals)

    # ---- the stage ------------------------------------------------------------------

    async def run(self, request: web.Request, req: ParsedRequest, served: ServedModel, build: Build,
                  send: Send) -> web.StreamResponse:
        tiers = served.tiers
        if served.chooser is not None:
            _, score = await served.chooser.choose(prompt_text(req.body))
            lo, hi = self.cfg.band
            if score >= hi:  # the classifier is sure the strong tier is needed: no cheap try
                return await Try(self, request, served, build, send).final(tiers[-1], req)
            if score < lo:  # sure the cheap tier will do: no check either
                return await Try(self, request, served, build, send).final(tiers[0], req)
        return await Try(self, request, served, build, send).cascade(req)


class Try:
    """One request's walk through the tiers: its grants, wasted usage and the answer kept so far."""

    def __init__(self, cascade: Cascade, request: web.Request, served: ServedModel, build: Build, send: Send):
        self.c, self.request, self.served, self.build, self.send = cascade, request, served, build, send
        self.app = request.app
        self.governor = self.app.get(keys.GOVERNOR)
        self.first: Grant | None = None
        self.spent: dict | None = None  # usage of earlier tries, added to the final response's

    async def _admit(self, route: ModelRoute, req: ParsedRequest) -> tuple[ModelRoute, RequestContext,
                                                                          ParsedRequest, Grant | None]:
        ctx = await self.build(route, req)
        if self.governor is None:
            return route, ctx, req, None
        if self.first is None:
            grant = await self.governor.admit(req, self.served, route, ctx, rebuild=self.build,
                                              authorization=self.request.headers.get("Authorization"))
            self.first = grant
        else:
            grant = await self.governor.admit_escalation(self.first, self.served, route, ctx, rebuild=self.build)
            if grant.route is not route:  # a downgrade budget sent it back down: no point in this try
                self.governor.finish(grant, None)
                raise BudgetExceeded(f"A budget refused the escalation to tier '{route.cfg.tier}'.")
        return grant.route, grant.ctx, grant.req, grant

    async def _send(self, route: ModelRoute, req: ParsedRequest, **options) -> tuple[web.StreamResponse, dict | None]:
        """One governed, proxied, accounted try; returns the response and the try's usage."""
        route, ctx, req, grant = await self._admit(route, req)
        if route.cfg.tier:
            self.app[keys.METRICS].tier_requests.labels(self.served.name, route.cfg.tier).inc()
        tries: list = []
        try:
            resp = await self.send(self.request, route, ctx, req, grant, tries, **options)
            return resp, tries[-1].usage if tries else None
        finally:
            if grant is not None:
                self.governor.finish(grant, tries[-1] if tries else None)

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
                body = orjson.loads(resp.body)
                body["usage"] = add_usage(self.spent, body.get("usage"))
                resp.body = orjson.dumps(body)

    async def cascade(self, req: ParsedRequest) -> web.StreamResponse:
        tiers = self.served.tiers
        probe = req.stream and self.c.cfg.stream_policy == "first_tokens"
        question = prompt_text(req.body)
        for i, route in enumerate(tiers[:-1]):
            resp, usage, answer = await self._cheap(route, req, probe)
            verdict = await self.c.confidence(question, answer, probe)
            kept = verdict.confidence >= self.c.cfg.threshold
            if kept and not probe:
                return await self._emit(resp, req)
            if kept:  # the probe said yes: the cheap tier streams the original request
                self._spend(usage)
                self.c.metrics.cascade_wasted_tokens.labels(self.served.name).inc(_tokens(usage))
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
        if probe:
            cap = body.get("max_completion_tokens") or body.get("max_tokens") or self.c.cfg.first_tokens
            body["max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"] = min(
                cap, self.c.cfg.first_tokens)
        inner = replace(req, body=body, stream=False, wants_usage_chunk=False)
        try:
            resp, usage = await self._send(route, inner)
        except TRY_ERRORS as exc:
            log.info("cascade %s: tier %s failed (%s), escalating", self.served.name, route.cfg.tier, exc.message)
            return None, None, Answer("", None, ok=False)
        try:
            parsed = orjson.loads(resp.body)  # type: ignore[union-attr]
        except (orjson.JSONDecodeError, TypeError):
            return resp, usage, Answer("", None, ok=False)  # type: ignore[return-value]
        return resp, usage, parse_answer(parsed)  # type: ignore[return-value]

    def _spend(self, usage: dict | None) -> None:
        """Remember an earlier try's usage: the final response reports the sum over tries."""
        if usage:
            self.spent = add_usage(self.spent, usage)

    def _escalated(self, frm: ModelRoute, to: ModelRoute, usage: dict | None) -> None:
        self.c.metrics.cascade_escalations.labels(self.served.name, frm.cfg.tier, to.cfg.tier).inc()
        self.c.metrics.cascade_wasted_tokens.labels(self.served.name).inc(_tokens(usage))

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
