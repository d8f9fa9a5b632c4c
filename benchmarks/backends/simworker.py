"""One simulated vLLM worker: a block-level prefix cache and a continuous-batching scheduler.

The model follows vLLM v1 closely enough for routing questions:
- KV memory is ``capacity_blocks`` blocks of ``block_size`` tokens. A request's full
  prompt blocks are keyed by their chain hash and shared; its partial last block and its
  decode tokens take private blocks. Blocks are registered at admission, as vLLM caches
  blocks when it allocates them, so requests admitted in the same step already share.
- Blocks no running request uses stay cached and are evicted least recently used first;
  a finished request frees its blocks tail first, as vLLM does, so a shared prefix
  outlives the unique questions behind it.
- Hits: the longest cached prefix, capped so that at least one prompt token is computed.
  Counters mirror ``/metrics``: prefix_cache_queries/hits, prompt and generation tokens,
  running and waiting.
- KV events (optional ``listener``): like vLLM's ``BlockStored`` at the end of the step
  that computes a request's new blocks, and ``BlockRemoved`` when a block is evicted.
- Each engine step decodes one token for every running request and spends the rest of a
  ``max_batched_tokens`` budget on (chunked) prefill of the oldest requests, admitting
  new ones FIFO while sequences and blocks allow. Step time = ``step_s`` +
  ``prefill_s_per_token`` * prefill tokens + ``decode_s_per_seq`` * decoding requests.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# (url, "stored" | "removed", block keys): what a vLLM worker's KV events would say
KvListener = Callable[[str, str, list[int]], None]


@dataclass(frozen=True)
class Timing:
    """Cost model; defaults are rough figures for the tiny model on these CPUs."""

    step_s: float = 0.004
    prefill_s_per_token: float = 0.00006
    decode_s_per_seq: float = 0.0004
    max_num_seqs: int = 64
    max_batched_tokens: int = 4096


@dataclass
class SimRequest:
    rid: int
    keys: tuple[int, ...]
    prompt_tokens: int
    max_tokens: int
    arrival: float
    payload: Any = None  # the simulator's own bookkeeping
    prefill_left: int = 0
    generated: int = 0
    hit_tokens: int = 0
    private_blocks: int = 0
    first_token_at: float | None = None
    done_at: float | None = None
    shared: list[int] = field(default_factory=list)  # keyed blocks this request holds
    new_keys: list[int] = field(default_factory=list)  # keyed blocks this request computes


class SimWorker:
    def __init__(self, url: str, capacity_blocks: int, block_size: int, timing: Timing,
                 listener: KvListener | None = None):
        self.url = url
        self.listener = listener
        self.capacity = capacity_blocks
        self.block_size = block_size
        self.timing = timing
        self.refs: dict[int, int] = {}  # keyed block -> running requests using it
        self.free: OrderedDict[int, None] = OrderedDict()  # cached, unused; front evicted first
        self.private = 0  # blocks of partial tails and decode tokens
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.busy_until: float | None = None  # end of the step in progress
        # counters as vLLM's /metrics names them
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests_done = 0
        self.evictions = 0

    # -- cache -------------------------------------------------------------------------
    def used_blocks(self) -> int:
        return len(self.refs) + len(self.free) + self.private

    def cached_prefix(self, keys: tuple[int, ...]) -> int:
        """Length in blocks of the longest cached prefix of ``keys``."""
        n = 0
        for k in keys:
            if k in self.refs or k in self.free:
                n += 1
            else:
                break
        return n

    def _try_allocate(self, req: SimRequest) -> bool:
        bs = self.block_size
        hit = min(self.cached_prefix(req.keys), (req.prompt_tokens - 1) // bs)
        new_keyed = [k for k in req.keys[hit:] if k not in self.refs and k not in self.free]
        total_blocks = math.ceil((req.prompt_tokens + req.max_tokens) / bs)
        private = max(0, total_blocks - len(req.keys))
        need = len(new_keyed) + private
        # cached-but-unused blocks this request reuses are not evictable for it
        reusable_free = sum(1 for k in req.keys if k in self.free)
        if len(self.refs) + self.private + reusable_free + need > self.capacity:
            return False
        for k in req.keys:
            if k in self.free:
                del self.free[k]
                self.refs[k] = 1
            else:
                self.refs[k] = self.refs.get(k, 0) + 1
        overflow = self.used_blocks() + private - self.capacity
        evicted = []
        while overflow > 0 and self.free:
            evicted.append(self.free.popitem(last=False)[0])
            self.evictions += 1
            overflow -= 1
        if evicted and self.listener is not None:
            self.listener(self.url, "removed", evicted)
        req.new_keys = new_keyed
        self.private += private
        req.private_blocks = private
        req.shared = list(req.keys)
        req.hit_tokens = hit * bs
        req.prefill_left = req.prompt_tokens - req.hit_tokens
        self.prefix_queries += req.prompt_tokens
        self.prefix_hits += req.hit_tokens
        self.prompt_tokens += req.prompt_tokens
        return True

    def _release(self, req: SimRequest) -> None:
        for k in reversed(req.shared):  # tail first: it is evicted first
            n = self.refs[k] - 1
            if n:
                self.refs[k] = n
            else:
                del self.refs[k]
                self.free[k] = None
        self.private -= req.private_blocks
        req.shared = []

    # -- scheduling --------------------------------------------------------------------
    def submit(self, req: SimRequest) -> None:
        self.waiting.append(req)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def kv_usage(self) -> float:
        return (len(self.refs) + self.private) / self.capacity

    def plan_step(self) -> tuple[float, list[tuple[SimRequest, int]]] | None:
        """Admit what fits and decide this step's prefill chunks; None when idle."""
        t = self.timing
        budget = t.max_batched_tokens - sum(1 for r in self.running if r.prefill_left == 0)
        while (
            self.waiting
            and len(self.running) < t.max_num_seqs
            and budget > 0
            and self._try_allocate(self.waiting[0])
        ):
            self.running.append(self.waiting.popleft())
        if not self.running:
            return None
        chunks: list[tuple[SimRequest, int]] = []
        decoding = 0
        for r in self.running:
            if r.prefill_left == 0:
                decoding += 1
            elif budget > 0:
                n = min(r.prefill_left, budget)
                budget -= n
                chunks.append((r, n))
        prefill = sum(n for _, n in chunks)
        return t.step_s + t.prefill_s_per_token * prefill + t.decode_s_per_seq * decoding, chunks

    def finish_step(
        self, now: float, chunks: list[tuple[SimRequest, int]]
    ) -> tuple[list[SimRequest], list[SimRequest]]:
        """Apply a planned step that ended at ``now``: (requests that finished, first tokens)."""
        prefilled = set()
        for r, n in chunks:
            r.prefill_left -= n
            if r.prefill_left == 0:
                prefilled.add(r.rid)
                if r.new_keys and self.listener is not None:
                    self.listener(self.url, "stored", r.new_keys)
        done: list[SimRequest] = []
        started: list[SimRequest] = []
        keep: list[SimRequest] = []
        for r in self.running:
            if r.prefill_left == 0 and (r.rid in prefilled or r.first_token_at is not None):
                if r.first_token_at is None:
                    r.first_token_at = now
                    started.append(r)
                r.generated += 1
                self.generation_tokens += 1
                if r.generated >= r.max_tokens:
                    r.done_at = now
                    self._release(r)
                    self.requests_done += 1
                    done.append(r)
                    continue
            keep.append(r)
        self.running = keep
        return done, started
