"""Online threshold calibration: hold a target share of requests on the strong tier.

An artifact's threshold is a quantile of its scores on a calibration set; when live
traffic is harder or easier than that set, the share sent to the strong tier drifts (a
threshold set for 30% sends 100% of some task families to the strong tier). With
``classifier.target_strong_share`` set, the router tracks the quantile of live scores
that holds the target share (:class:`OnlineThreshold`) and routes at it.

:class:`ScoreSketch` is an exponentially decayed histogram of scores (fixed bins in
logit space, so sketches add up across replicas); ``kvroute classifier`` tooling and the
replay benchmark read quantiles from it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from kvroute.router.config import OnlineCalibrationConfig
from kvroute.router.governance.config import RedisConfig

log = logging.getLogger(__name__)

_BINS, _LO, _HI = 512, -12.0, 12.0


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


class ScoreSketch:
    """Exponentially decayed histogram of scores in [0, 1], binned in logit space."""

    def __init__(self, window: int) -> None:
        self.decay = 1.0 - 1.0 / max(window, 1)
        self.counts = np.zeros(_BINS)

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def add(self, scores: Sequence[float]) -> None:
        n = len(scores)
        if n == 0:
            return
        bins = self._bin(np.asarray(scores, dtype=float))
        self.counts *= self.decay**n
        np.add.at(self.counts, bins, self.decay ** np.arange(n - 1, -1, -1, dtype=float))

    def share_at_or_above(self, threshold: float) -> float:
        """Share of the (decayed) scores at or above ``threshold``, interpolated in its bin."""
        total = self.total
        if total <= 0:
            return 0.0
        pos = (float(_logit(np.array([threshold]))[0]) - _LO) / (_HI - _LO) * _BINS
        b = min(max(int(pos), 0), _BINS - 1)
        frac = min(max(pos - b, 0.0), 1.0)
        above = self.counts[b + 1:].sum() + self.counts[b] * (1.0 - frac)
        return float(above / total)

    def threshold_for(self, share: float) -> float:
        """The score above which ``share`` of the (decayed) scores lie."""
        total = self.total
        if total <= 0:
            return 0.5
        want = min(max(share, 0.0), 1.0) * total
        from_top = np.cumsum(self.counts[::-1])  # weight in the top i+1 bins
        i = int(np.searchsorted(from_top, want))
        if i >= _BINS:
            return 0.0
        b = _BINS - 1 - i  # the bin where the cumulative weight crosses ``want``
        before = from_top[i - 1] if i > 0 else 0.0
        inside = self.counts[b]
        frac = (want - before) / inside if inside > 0 else 0.0  # share of the bin above the cut
        edge = _LO + (b + 1 - frac) * (_HI - _LO) / _BINS
        return 1.0 / (1.0 + math.exp(-edge))

    def _bin(self, scores: np.ndarray) -> np.ndarray:
        pos = (_logit(scores) - _LO) / (_HI - _LO) * _BINS
        return np.clip(pos.astype(int), 0, _BINS - 1)


class OnlineThreshold:
    """The live threshold and the recent strong share for one tiered model.

    After each routed prompt the threshold moves ``step`` (logit units) up when that
    prompt went to the strong tier and down otherwise, weighted so that it rests where
    ``target_strong_share`` of prompts reach it: ``logit(t) += step * (strong - target)``.
    This is a stochastic-approximation quantile tracker (Robbins-Monro). Its useful
    property is that the realised share over any n prompts is the target plus
    (threshold change in logits) / (step * n): a stream whose scores shift needs its
    threshold moved, and the move is what it costs in share, spread over the prompts. The
    threshold moves at most ``step * max(target, 1 - target)`` per prompt and stays within
    [``floor``, ``ceiling``]. Each replica holds the share on its own traffic; with
    ``online.shared`` the replicas also move one threshold together (:class:`SharedThreshold`).
    """

    def __init__(self, cfg: OnlineCalibrationConfig, initial: float) -> None:
        self.cfg = cfg
        self.reset(initial)

    def reset(self, initial: float) -> None:
        """Start over from ``initial`` (a new artifact: its scores are on a new scale)."""
        self.initial_logit = float(_logit(np.array([self._clamp(initial)]))[0])
        self._logit = self.initial_logit
        self._pending = 0.0  # moves not yet added to the shared threshold
        self.seen = 0
        self._share = DecayedMean(self.cfg.window)

    @property
    def bounds(self) -> tuple[float, float]:
        """[floor, ceiling] in logits."""
        lo, hi = _logit(np.array([self.cfg.floor, self.cfg.ceiling]))
        return float(lo), float(hi)

    @property
    def threshold(self) -> float:
        return self._clamp(1.0 / (1.0 + math.exp(-self._logit)))

    @property
    def strong_share(self) -> float:
        """Share of recent prompts (decayed over ``window``) sent to the strong tier."""
        return self._share.value

    def observe(self, scores: Sequence[float]) -> None:
        """Record a batch routed at the current threshold, then move the threshold."""
        if not len(scores):
            return
        strong = np.asarray(scores, dtype=float) >= self.threshold
        self._share.add(strong.tolist())
        self.seen += len(scores)
        move = self.cfg.step * float((strong - self.cfg.target_strong_share).sum())
        self._pending += move
        lo, hi = self.bounds
        self._logit = min(max(self._logit + move, lo), hi)  # no wind-up beyond the bounds

    def take_pending(self) -> float:
        """The moves made since the last call, for the shared threshold."""
        moves, self._pending = self._pending, 0.0
        return moves

    def give_back(self, moves: float) -> None:
        """``take_pending``'s moves, not delivered: they go with the next sync."""
        self._pending += moves

    def adopt(self, shared_logit: float) -> None:
        """Route at the shared threshold, plus the moves made while it was being fetched."""
        lo, hi = self.bounds
        self._logit = min(max(shared_logit + self._pending, lo), hi)

    def _clamp(self, t: float) -> float:
        return min(max(float(t), self.cfg.floor), self.cfg.ceiling)


class DecayedMean:
    """Mean of 0/1 outcomes where each older one fades by ``1 - 1/window`` per new one."""

    def __init__(self, window: int) -> None:
        self.decay = 1.0 - 1.0 / max(window, 1)
        self._hits = 0.0
        self._total = 0.0

    def add(self, outcomes: Sequence[bool]) -> None:
        n = len(outcomes)
        if n == 0:
            return
        w = self.decay ** np.arange(n - 1, -1, -1, dtype=float)
        self._hits = self._hits * self.decay**n + float(w[np.asarray(outcomes, dtype=bool)].sum())
        self._total = self._total * self.decay**n + float(w.sum())

    @property
    def value(self) -> float:
        return self._hits / self._total if self._total > 0 else 0.0


# The shared threshold, in logits: created at the artifact's own, moved by every replica's
# moves, kept within [floor, ceiling], and forgotten a week after its last move.
_SYNC = """
local v = redis.call('GET', KEYS[1])
v = (v and tonumber(v) or tonumber(ARGV[1])) + tonumber(ARGV[2])
v = math.min(math.max(v, tonumber(ARGV[3])), tonumber(ARGV[4]))
local out = string.format('%.17g', v)
redis.call('SET', KEYS[1], out, 'EX', ARGV[5])
return out
"""


class SharedThreshold:
    """One online threshold for every replica of a model (``classifier.online.shared``).

    Every ``sync_s`` a replica adds the moves its own prompts made since its last sync to
    the threshold in Redis (one script call, atomic) and routes at the sum. The replicas
    then run one Robbins-Monro tracker over the whole fleet's traffic: a replica that has
    just started, or that sees little traffic, routes at the threshold the fleet has found
    instead of the artifact's. The key holds the artifact's version, so a new artifact
    starts its own threshold. When Redis fails, each replica goes on tracking alone and
    delivers its moves once Redis answers again.
    """

    TTL_S = 7 * 86400

    def __init__(self, redis: RedisConfig, model: str) -> None:
        from kvroute.router.governance.redis_store import redis_client

        self.client = redis_client(redis)
        self._sync = self.client.register_script(_SYNC)
        self.prefix = f"{redis.prefix}:cal:{model}"
        self.failing = False

    async def sync(self, online: OnlineThreshold, version: str) -> bool:
        """Deliver ``online``'s moves and adopt the shared threshold; False when Redis failed."""
        from redis.exceptions import RedisError

        moves = online.take_pending()
        lo, hi = online.bounds
        try:
            shared = await self._sync(keys=[f"{self.prefix}:{version}"],
                                      args=[repr(online.initial_logit), repr(moves), repr(lo), repr(hi), self.TTL_S])
        except (RedisError, OSError, TimeoutError) as exc:
            online.give_back(moves)
            if not self.failing:
                log.warning("shared classifier threshold: Redis failed (%s); tracking on this replica alone", exc)
            self.failing = True
            return False
        if self.failing:
            log.warning("shared classifier threshold: Redis answers again")
        self.failing = False
        online.adopt(float(shared))
        return True

    async def close(self) -> None:
        await self.client.aclose()
