"""Online threshold calibration and shadow mode of the tier classifier."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

from kvroute.router.calibration import DecayedMean, OnlineThreshold, ScoreSketch, SharedThreshold, _logit
from kvroute.router.config import ClassifierConfig, OnlineCalibrationConfig, config_from_dict
from kvroute.router.errors import ConfigError
from kvroute.router.metrics import RouterMetrics
from kvroute.router.tiers import TierChooser
from tests.governance.conftest import PATIENT

TWO_TIERS = [{"name": "s", "workers": ["http://a:1"]}, {"name": "l", "workers": ["http://b:1"]}]


def _replay(online: OnlineThreshold, scores: np.ndarray, batch: int = 8) -> np.ndarray:
    """Route ``scores`` in batches at the live threshold; return who went strong."""
    strong = np.zeros(len(scores), dtype=bool)
    for i in range(0, len(scores), batch):
        strong[i : i + batch] = scores[i : i + batch] >= online.threshold
        online.observe(scores[i : i + batch].tolist())
    return strong


def test_the_share_holds_when_the_traffic_turns_harder_and_easier():
    rng = np.random.default_rng(0)
    # easy traffic, then hard, then easy again: a fixed threshold would send 4% .. 90% strong
    scores = np.concatenate([rng.beta(2, 8, 3000), rng.beta(8, 2, 3000), rng.beta(2, 8, 3000)])
    static = np.quantile(rng.beta(5, 5, 5000), 0.7)  # calibrated on middling traffic
    online = OnlineThreshold(OnlineCalibrationConfig(0.3, step=0.2), static)
    strong = _replay(online, scores)
    # over n prompts the share misses by (threshold move in logits) / (step * n): about 3
    # logits at each switch here, so 1000-prompt blocks hold within 3 points
    blocks = strong.reshape(-1, 1000).mean(axis=1)
    assert np.abs(blocks[1:] - 0.3).max() <= 0.03  # the first block holds the warm-up
    fixed = (scores >= static).reshape(-1, 1000).mean(axis=1)
    assert np.abs(fixed - 0.3).max() > 0.25
    assert abs(online.strong_share - 0.3) < 0.05


def test_the_threshold_moves_at_a_bounded_rate_and_stays_within_floor_and_ceiling():
    cfg = OnlineCalibrationConfig(0.3, step=0.1, floor=0.2, ceiling=0.8)
    online = OnlineThreshold(cfg, 0.5)
    online.observe([0.99])  # one strong decision moves the logit up by step * (1 - 0.3)
    assert np.isclose(np.log(online.threshold / (1 - online.threshold)), 0.07)
    online.observe([1.0] * 1000)  # everything strong: it rises, but not past the ceiling
    assert online.threshold == 0.8
    online.observe([0.0] * 30)  # no wind-up: it starts down from the ceiling at once
    assert online.threshold < 0.8
    online.observe([0.0] * 5000)
    assert online.threshold == 0.2
    online.reset(0.1)  # a new artifact: back to its threshold, clamped
    assert online.threshold == 0.2 and online.seen == 0 and online.strong_share == 0.0


def test_sketch_quantiles_match_the_recent_scores():
    rng = np.random.default_rng(1)
    sketch = ScoreSketch(window=5000)
    old, new = rng.beta(2, 5, 20000), rng.beta(5, 2, 20000)
    sketch.add(old.tolist())
    assert abs(sketch.threshold_for(0.3) - np.quantile(old, 0.7)) < 0.01
    sketch.add(new.tolist())  # four windows later the old scores weigh exp(-4)
    t = sketch.threshold_for(0.3)
    assert abs(t - np.quantile(new, 0.7)) < 0.02
    assert abs(sketch.share_at_or_above(t) - 0.3) < 0.01


def test_decayed_mean_forgets_old_outcomes():
    m = DecayedMean(window=100)
    m.add([True] * 1000)
    m.add([False] * 500)
    assert m.value < 0.01


def test_config_reads_target_share_and_online_knobs():
    cfg = config_from_dict({"models": [{"name": "auto", "tiers": TWO_TIERS, "classifier": {
        "target_strong_share": 0.25, "online": {"step": 0.1, "window": 500, "floor": 0.05, "ceiling": 0.9}}}]})
    online = cfg.models[0].classifier.online
    assert online == OnlineCalibrationConfig(0.25, step=0.1, window=500, floor=0.05, ceiling=0.9)
    plain = config_from_dict({"models": [{"name": "auto", "tiers": TWO_TIERS}]})
    assert plain.models[0].classifier.online is None and plain.models[0].classifier.shadow is None


def test_config_reads_a_shadow_artifact():
    from kvroute.classifier.model import DEFAULT_ARTIFACT

    cfg = config_from_dict({"models": [{"name": "auto", "tiers": TWO_TIERS,
                                        "classifier": {"shadow": str(DEFAULT_ARTIFACT)}}]})
    assert cfg.models[0].classifier.shadow == str(DEFAULT_ARTIFACT)


@pytest.mark.parametrize("classifier, key", [
    ({"target_strong_share": 1.5}, "models[0].classifier.target_strong_share"),
    ({"target_strong_share": 0.3, "thresholds": [0.5]}, "models[0].classifier.target_strong_share"),
    ({"online": {"step": 0.1}}, "models[0].classifier.online"),
    ({"target_strong_share": 0.3, "online": {"step": -1}}, "models[0].classifier.online.step"),
    ({"target_strong_share": 0.3, "online": {"floor": 0.6, "ceiling": 0.5}}, "models[0].classifier.online"),
    ({"target_strong_share": 0.3, "online": {"speed": 1}}, "models[0].classifier.online.speed"),
    ({"shadow": "/no/such/artifact"}, "models[0].classifier.shadow"),
])
def test_config_errors_name_the_key(classifier, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"models": [{"name": "auto", "tiers": TWO_TIERS, "classifier": classifier}]})
    assert err.value.key == key


def test_target_share_needs_two_tiers():
    tiers = TWO_TIERS + [{"name": "xl", "workers": ["http://c:1"]}]
    with pytest.raises(ConfigError) as err:
        config_from_dict({"models": [{"name": "auto", "tiers": tiers, "classifier": {
            "target_strong_share": 0.3, "thresholds": [0.3, 0.6]}}]})
    assert err.value.key == "models[0].classifier.target_strong_share"


class ScoreOf:
    """Reads the score from the prompt ("0.42 ..."); a stand-in whose scores a test picks."""

    version = "score-of"

    def __init__(self, threshold: float, flip: bool = False):
        self.threshold, self.flip = threshold, flip

    def score(self, prompts):
        s = [float(p.split()[0]) for p in prompts]
        return [1 - x for x in s] if self.flip else s


async def test_chooser_routes_at_the_online_threshold_and_exports_it():
    metrics = RouterMetrics()
    cfg = ClassifierConfig(online=OnlineCalibrationConfig(0.3, step=0.2), batch_window_ms=0)
    c = TierChooser("auto", cfg, 2, ThreadPoolExecutor(1), metrics)
    c.scorer = ScoreOf(0.5)
    c._calibrate_from(c.scorer)
    rng = np.random.default_rng(2)
    tiers = [(await c.choose(f"{s:.4f}"))[0] for s in rng.beta(2, 8, 1500)]  # mostly below 0.5
    assert abs(np.mean(tiers[500:]) - 0.3) <= 0.03
    assert c.thresholds[0] < 0.5
    page = metrics.render().decode()
    assert f'kvroute_classifier_threshold{{model="auto"}} {c.online.threshold}' in page
    share = metrics.classifier_strong_share.labels("auto")._value.get()
    assert abs(share - 0.3) < 0.05


async def test_a_shadow_scores_beside_the_live_model_without_routing():
    metrics = RouterMetrics()
    c = TierChooser("auto", ClassifierConfig(batch_window_ms=5), 2, ThreadPoolExecutor(1), metrics)
    c.scorer = ScoreOf(0.5)
    c.shadow = ScoreOf(0.5, flip=True)  # disagrees with the live model wherever s != 0.5
    results = await asyncio.gather(*(c.choose(f"{s} q") for s in (0.9, 0.8, 0.1, 0.7)))
    assert [t for t, _ in results] == [1, 1, 0, 1]  # the live model routed
    from tests.clock import until

    await until(lambda: not c._scoring)
    assert metrics.would_be_strong.labels("auto", "live")._value.get() == 3
    assert metrics.would_be_strong.labels("auto", "shadow")._value.get() == 1
    assert metrics.shadow_agreement.labels("auto")._value.get() == 0.0
    assert "kvroute_classifier_shadow_agreement" in metrics.render().decode()


async def test_chooser_loads_the_shadow_from_config(tmp_path):
    from kvroute.classifier.artifact import export
    from kvroute.classifier.model import DEFAULT_ARTIFACT

    shadow = export(DEFAULT_ARTIFACT, tmp_path / "shadow", {"version": "candidate-1"})
    cfg = ClassifierConfig(shadow=str(shadow), online=OnlineCalibrationConfig(0.3))
    metrics = RouterMetrics()
    c = TierChooser("auto", cfg, 2, ThreadPoolExecutor(1), metrics)
    await c.load()
    assert c.shadow.version == "candidate-1" and c.shadow_online is not None
    await asyncio.gather(*(c.choose(f"What is {i} + {i}?") for i in range(5)))
    await c.close()
    assert metrics.shadow_agreement.labels("auto")._value.get() == 1.0  # the same weights agree


async def test_a_missing_shadow_is_a_config_error_naming_the_key(tmp_path):
    c = TierChooser("auto", ClassifierConfig(shadow=str(tmp_path / "none")), 2, ThreadPoolExecutor(1),
                    RouterMetrics())
    with pytest.raises(ConfigError) as err:
        await c.load()
    assert err.value.key == "models[auto].classifier.shadow"


def shared_config(redis_url: str, **online) -> dict:
    return {"models": [{"name": "auto", "tiers": TWO_TIERS, "classifier": {
        "target_strong_share": 0.3, "online": {"shared": True, **online}}}],
        "governance": {"redis": {"url": redis_url, "prefix": f"test-{uuid.uuid4().hex[:8]}", **PATIENT}}}


def test_a_shared_threshold_needs_governance_redis_and_uses_it(redis_url):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"models": [{"name": "auto", "tiers": TWO_TIERS, "classifier": {
            "target_strong_share": 0.3, "online": {"shared": True}}}]})
    assert err.value.key == "models[0].classifier.online.shared"
    online = config_from_dict(shared_config(redis_url, sync_s=0.5)).models[0].classifier.online
    assert online.shared and online.sync_s == 0.5 and online.redis.url == redis_url


def replica(redis_url_or_cfg, threshold: float = 0.5) -> tuple[OnlineThreshold, SharedThreshold]:
    online = config_from_dict(redis_url_or_cfg).models[0].classifier.online
    return OnlineThreshold(online, threshold), SharedThreshold(online.redis, "auto")


async def test_replicas_move_one_shared_threshold(redis_url):
    cfg = shared_config(redis_url)
    (a, sa), (b, sb) = replica(cfg), replica(cfg)
    try:
        assert await sa.sync(a, "v1") and await sb.sync(b, "v1")
        assert a.threshold == b.threshold == 0.5  # created at the artifact's own
        rng = np.random.default_rng(3)
        _replay(a, rng.beta(2, 8, 400))  # only replica a sees traffic; mostly below 0.5
        moved = a.threshold
        assert moved < 0.5
        assert await sa.sync(a, "v1") and await sb.sync(b, "v1")
        assert b.threshold == pytest.approx(moved)  # b routes where the fleet's traffic put it
        # both move it: the shared logit is the sum of both replicas' moves
        before = float(_logit(np.array([b.threshold]))[0])
        _replay(a, np.full(10, 0.99))
        _replay(b, np.full(10, 0.99))
        await sa.sync(a, "v1")
        await sb.sync(b, "v1")
        expected = before + 2 * 10 * a.cfg.step * (1 - a.cfg.target_strong_share)
        assert float(_logit(np.array([b.threshold]))[0]) == pytest.approx(expected)
        assert a.threshold < b.threshold  # a has not yet seen b's moves ...
        await sa.sync(a, "v1")
        assert a.threshold == pytest.approx(b.threshold)  # ... until its next sync
        late, sl = replica(cfg, threshold=0.9)  # a replica started later starts at the fleet's
        assert await sl.sync(late, "v1") and late.threshold == pytest.approx(b.threshold)
        other, so = replica(cfg)  # a new artifact version starts its own threshold
        assert await so.sync(other, "v2") and other.threshold == 0.5
        await sl.close()
        await so.close()
    finally:
        await sa.close()
        await sb.close()


async def test_without_redis_a_replica_tracks_alone_and_delivers_its_moves_later(redis_url):
    cfg = shared_config(redis_url)
    down = {**cfg, "governance": {"redis": {"url": "redis://127.0.0.1:1", "connect_timeout_s": 0.2}}}
    online, broken = replica(down)
    _replay(online, np.full(20, 0.99))
    alone = online.threshold
    assert alone > 0.5 and not await broken.sync(online, "v1") and broken.failing
    assert online.threshold == alone  # still routing at its own
    _, working = replica(cfg)
    assert await working.sync(online, "v1")  # Redis back: the moves made meanwhile arrive
    assert online.threshold == pytest.approx(alone)
    await broken.close()
    await working.close()


async def test_a_chooser_syncs_the_shared_threshold_and_exports_it(redis_url):
    cfg = config_from_dict(shared_config(redis_url, sync_s=0.05)).models[0].classifier
    metrics = [RouterMetrics(), RouterMetrics()]
    busy, quiet = (TierChooser("auto", replace(cfg, batch_window_ms=0), 2, ThreadPoolExecutor(1), m)
                   for m in metrics)
    for c in (busy, quiet):
        c.scorer = ScoreOf(0.5)
        c.version = "score-of"
        c._calibrate_from(c.scorer)
    loops = [asyncio.create_task(c.sync_loop()) for c in (busy, quiet)]
    try:
        for s in np.random.default_rng(4).beta(2, 8, 300):
            await busy.choose(f"{s:.4f}")
        assert busy.thresholds[0] < 0.5
        for _ in range(200):  # the loops sync every 0.05 s: busy sends its moves, quiet takes them
            if quiet.thresholds[0] == pytest.approx(busy.thresholds[0], abs=1e-9):
                break
            await asyncio.sleep(0.05)
        assert quiet.thresholds[0] == pytest.approx(busy.thresholds[0], abs=1e-9)
        assert metrics[1].classifier_threshold.labels("auto")._value.get() == pytest.approx(quiet.thresholds[0])
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        for c in (busy, quiet):
            await c.close()
