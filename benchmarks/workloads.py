"""Seeded, deterministic request streams for routing benchmarks, and their JSONL traces.

A workload is a sequence of ``TraceRecord``: one OpenAI chat request (``body``), its
arrival offset in seconds (``t``), the ``group`` an oracle would pin it by (the shared
prefix it carries) and an optional ``session`` key. The same ``WorkloadSpec`` always
yields the same records, so routers are compared on identical structure.

Prompts are built from a fixed word list, because no corpus ships with the project. The
``nonce`` is hashed into every prefix: each router gets its own nonce in one benchmark
run, so its prompts are fresh and no router profits from KV blocks another one left in
the workers' caches. Record generation is lazy (``iter_records``) so that the simulator
can stream a million requests without holding them.

Workloads:
- ``shared-prefix``: G groups, each a ~``prefix_tokens`` system prompt, questions
  interleaved at random (the classic prefix-routing case).
- ``multi-turn``: concurrent sessions whose history grows by one exchange per turn.
- ``agent``: tool-call loops; agents share one of a few long tool schemas, and each step
  appends a tool result (sent as a user message, which every chat template accepts).
- ``hot-prefix``: like shared-prefix, but ``hot_share`` of the traffic uses group 0.
- ``trace``: replay a JSONL file written by ``write_trace``.

Every command that runs a workload takes the same flags: ``add_workload_args`` defines
them and ``workload_from_args`` turns the parsed flags into a ``WorkloadSpec``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import xxhash

WORKLOADS = ("shared-prefix", "multi-turn", "agent", "hot-prefix", "trace")

# Tokens per word of this list under the tiny model's BPE, measured: 1.26 for plain word
# runs, 1.43 for sentences (capitals and full stops split words). Checked by
# tests/benchmarks/test_bench_workloads.py.
TOKENS_PER_WORD = 1.26
TOKENS_PER_SENTENCE_WORD = 1.43

_WORDS = tuple(
    """the of and to in is that for it as with be on not this by are or from at an if
    return value function object class list string file name data type default error
    module method number set first new when used which can will should all one each line
    time path result call argument instance key test case other only may more must into
    use following true false none self table index field node tree block cache worker
    request model token prompt query answer group session agent tool schema message
    system user question read write open close start stop send receive parse format check
    build load save find order count size length width height depth level state status
    event handler server client option config input output source target buffer stream
    socket thread process signal""".split()
)


@dataclass(frozen=True)
class TraceRecord:
    t: float  # arrival offset, seconds from the start of the run
    group: str  # the shared prefix this request carries; an oracle pins by it
    body: dict  # an OpenAI /v1/chat/completions request (without "stream")
    session: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> TraceRecord:
        raw = json.loads(line)
        return cls(
            t=float(raw["t"]), group=str(raw["group"]), body=raw["body"], session=raw.get("session")
        )


@dataclass(frozen=True)
class WorkloadSpec:
    name: str = "shared-prefix"
    seed: int = 0
    nonce: str = ""  # hashed into every prefix: a new nonce gives cold caches
    requests: int = 192
    groups: int = 16
    prefix_tokens: int = 1800
    question_tokens: int = 40
    max_tokens: int = 16
    rate: float = 0.0  # mean arrivals per second (Poisson); 0: all at t=0 (closed loop)
    model: str = "tiny"
    hot_share: float = 0.6  # hot-prefix: share of requests on group 0
    turns: int = 8  # multi-turn: turns per session; agent: steps per agent
    turn_tokens: int = 120  # multi-turn reply / agent tool-result size, tokens
    think_s: float = 2.0  # multi-turn / agent: gap between a session's turns
    trace_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def with_nonce(self, nonce: str) -> WorkloadSpec:
        return WorkloadSpec(**{**asdict(self), "nonce": nonce})

    def describe(self) -> dict[str, Any]:
        """The spec as result files record it (``"workload"``): every field but the nonce and extra."""
        return {k: v for k, v in vars(self).items() if k not in ("extra", "nonce")}


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """Add the workload flags (``--workload``, ``--requests``, ``--groups``, ``--seed``, ...)
    to ``parser``, in their own help group; ``workload_from_args`` reads them back."""
    g = parser.add_argument_group("workload")
    g.add_argument("--workload", choices=WORKLOADS, default="shared-prefix")
    g.add_argument("--trace", help="JSONL trace for --workload trace")
    g.add_argument("--requests", type=int, default=192)
    g.add_argument("--groups", type=int, default=16, help="prefix groups / concurrent sessions")
    g.add_argument("--prefix-tokens", type=int, default=1800)
    g.add_argument("--question-tokens", type=int, default=40)
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--hot-share", type=float, default=0.6)
    g.add_argument("--turns", type=int, default=8)
    g.add_argument("--rate", type=float, default=0.0, help="open-loop arrivals/s (0: closed loop)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--model", default="tiny", help="served model name")


def workload_from_args(args: argparse.Namespace) -> WorkloadSpec:
    """The ``WorkloadSpec`` that flags added by ``add_workload_args`` describe (no nonce)."""
    return WorkloadSpec(
        name=args.workload,
        seed=args.seed,
        requests=args.requests,
        groups=args.groups,
        prefix_tokens=args.prefix_tokens,
        question_tokens=args.question_tokens,
        max_tokens=args.max_tokens,
        rate=args.rate,
        model=args.model,
        hot_share=args.hot_share,
        turns=args.turns,
        trace_path=args.trace,
    )


class _Text:
    """Deterministic filler text from the word list."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def words(self, tokens: int) -> str:
        n = max(1, round(tokens / TOKENS_PER_WORD))
        return " ".join(self.rng.choices(_WORDS, k=n))

    def sentences(self, tokens: int) -> str:
        out: list[str] = []
        n = max(1, round(tokens / TOKENS_PER_SENTENCE_WORD))
        while n > 0:
            k = min(n, self.rng.randint(8, 16))
            out.append(" ".join(self.rng.choices(_WORDS, k=k)).capitalize() + ".")
            n -= k
        return " ".join(out)


def _tag(spec: WorkloadSpec, *parts: object) -> str:
    """A tag from the nonce: fresh prefixes per run at equal token counts.

    Hex digits joined by "|" are one token each in byte-level BPE, so every router's
    prompts have the same length. A bare hex digest took 24 to 26 tokens, which moved
    block boundaries and with them each router's cached tokens by a block here and there.
    """
    digest = xxhash.xxh64_hexdigest(
        (f"{spec.nonce}|{spec.seed}|" + "|".join(map(str, parts))).encode()
    )
    return "|".join(digest[:8])


def _arrivals(spec: WorkloadSpec, rng: random.Random) -> Iterator[float]:
    t = 0.0
    while True:
        yield t
        if spec.rate > 0:
            t += rng.expovariate(spec.rate)


def _body(spec: WorkloadSpec, messages: list[dict]) -> dict:
    return {
        "model": spec.model,
        "messages": messages,
        "max_tokens": spec.max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # vLLM extension: fixed decode length on a random-weight model
    }


def _group_prompts(spec: WorkloadSpec, kind: str) -> list[str]:
    text = _Text(random.Random(f"{spec.seed}:{kind}:prefix"))
    return [
        f"[{_tag(spec, kind, g)}] You are assistant {g}. " + text.sentences(spec.prefix_tokens)
        for g in range(spec.groups)
    ]


def _grouped(
    spec: WorkloadSpec, kind: str, choose: Callable[[random.Random], int]
) -> Iterator[TraceRecord]:
    rng = random.Random(f"{spec.seed}:{kind}")
    prompts = _group_prompts(spec, kind)
    text = _Text(rng)
    arrivals = _arrivals(spec, rng)
    order: Iterable[int]
    if kind == "shared-prefix":
        # exact questions per group (requests // groups, remainder to the first groups)
        idx = [i % spec.groups for i in range(spec.requests)]
        rng.shuffle(idx)
        order = idx
    else:
        order = (choose(rng) for _ in range(spec.requests))
    for i, g in enumerate(order):
        question = f"Question {i}: " + text.words(spec.question_tokens) + "?"
        messages = [
            {"role": "system", "content": prompts[g]},
            {"role": "user", "content": question},
        ]
        yield TraceRecord(t=round(next(arrivals), 6), group=f"g{g}", body=_body(spec, messages))


def _hot_choice(spec: WorkloadSpec) -> Callable[[random.Random], int]:
    def choose(rng: random.Random) -> int:
        if spec.groups == 1 or rng.random() < spec.hot_share:
            return 0
        return rng.randrange(1, spec.groups)

    return choose


def _sessions(spec: WorkloadSpec, kind: str) -> Iterator[TraceRecord]:
    """Multi-turn chats (kind 'multi-turn') or agent loops (kind 'agent').

    ``requests`` is split into sessions of ``turns`` requests; ``groups`` sessions run at
    once, each next one starting when one ends. A session's turn k arrives about
    ``think_s`` (0.5x to 1.5x, at random) after turn k-1 (open loop: the runner does not
    wait for the previous answer). The jitter matters: with a fixed period, sessions would
    arrive in the same order every round and round robin would pin them by accident.
    """
    rng = random.Random(f"{spec.seed}:{kind}")
    text = _Text(rng)
    n_sessions = max(1, math.ceil(spec.requests / spec.turns))
    schemas = (
        [
            f"[{_tag(spec, kind, 'schema', k)}] Tools:\n" + _tool_schema(text, spec.prefix_tokens)
            for k in range(max(1, spec.groups // 4))
        ]
        if kind == "agent"
        else []
    )
    gap = 1.0 / spec.rate if spec.rate > 0 else 0.0
    pending: list[tuple[float, int, str, str | None, list[dict]]] = []
    for s in range(n_sessions):
        slot, wave = s % spec.groups, s // spec.groups
        start = wave * (spec.turns * spec.think_s * 1.5 + gap) + slot * gap
        start += rng.uniform(0, spec.think_s)
        if kind == "agent":
            k = s % len(schemas)
            history = [
                {"role": "system", "content": schemas[k]},
                {"role": "user", "content": f"Task {s}: " + text.words(spec.question_tokens)},
            ]
            group = f"schema{k}"
        else:
            system = f"[{_tag(spec, kind, s)}] Chat {s}. " + text.sentences(
                spec.question_tokens * 2
            )
            history = [{"role": "system", "content": system}]
            group = f"s{s}"
        for turn in range(spec.turns):
            if kind == "agent":
                if turn:
                    history.append(
                        {"role": "assistant", "content": f"call tool_{turn % 7}(step={turn})"}
                    )
                    history.append(
                        {
                            "role": "user",
                            "content": f"[tool result {turn}] " + text.sentences(spec.turn_tokens),
                        }
                    )
            else:
                if turn:
                    history.append(
                        {"role": "assistant", "content": text.sentences(spec.turn_tokens)}
                    )
                history.append(
                    {"role": "user", "content": f"Turn {turn}: " + text.words(spec.question_tokens)}
                )
            if turn:
                start += spec.think_s * rng.uniform(0.5, 1.5)
            pending.append(
                (
                    start,
                    s * spec.turns + turn,
                    group,
                    f"{kind}-{s}",
                    list(history),
                )
            )
    pending.sort(key=lambda p: (p[0], p[1]))
    for t, _, group, session, messages in pending[: spec.requests]:
        yield TraceRecord(t=round(t, 6), group=group, body=_body(spec, messages), session=session)


def _tool_schema(text: _Text, tokens: int) -> str:
    tools = []
    per_tool = 120
    for i in range(max(1, tokens // per_tool)):
        tools.append(
            json.dumps(
                {
                    "name": f"tool_{i}",
                    "description": text.sentences(per_tool // 2),
                    "parameters": {
                        "type": "object",
                        "properties": {w: {"type": "string"} for w in text.rng.sample(_WORDS, 4)},
                    },
                }
            )
        )
    return "\n".join(tools)


def iter_records(spec: WorkloadSpec) -> Iterator[TraceRecord]:
    """The workload's records in arrival order (lazy where the workload allows)."""
    if spec.name == "shared-prefix":
        return _grouped(spec, "shared-prefix", lambda rng: 0)
    if spec.name == "hot-prefix":
        return _grouped(spec, "hot-prefix", _hot_choice(spec))
    if spec.name in ("multi-turn", "agent"):
        return _sessions(spec, spec.name)
    if spec.name == "trace":
        if not spec.trace_path:
            raise ValueError("workload 'trace' needs a trace file (--trace PATH)")
        return _renonce(spec, read_trace(spec.trace_path))
    raise ValueError(f"unknown workload {spec.name!r}; valid: {', '.join(WORKLOADS)}")


def _renonce(spec: WorkloadSpec, records: Iterator[TraceRecord]) -> Iterator[TraceRecord]:
    """A trace replays as written; with a nonce, each first message gets a fresh tag."""
    if not spec.nonce:
        yield from records
        return
    tag = f"[{_tag(spec, 'trace')}] "
    for rec in records:
        messages = [dict(m) for m in rec.body.get("messages", [])]
        if messages and isinstance(messages[0].get("content"), str):
            messages[0]["content"] = tag + messages[0]["content"]
        yield TraceRecord(
            t=rec.t, group=rec.group, body={**rec.body, "messages": messages}, session=rec.session
        )


def write_trace(records: Iterable[TraceRecord], path: str | Path) -> int:
    """Write records as JSONL; returns how many were written."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(rec.to_json() + "\n")
            n += 1
    return n


def read_trace(path: str | Path) -> Iterator[TraceRecord]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield TraceRecord.from_json(line)
