"""What the tests of the request APIs beyond chat share (test_embeddings, test_responses,
test_anthropic): a one-model router config, and a counter's total. Their ``upstream``
fixture, the fake worker, is in conftest.py."""

from __future__ import annotations

from kvroute.router.config import RouterConfig, config_from_dict


def config(worker: str, name: str = "tiny", upstream_model: str = "tiny-up", **top) -> RouterConfig:
    """One model on ``worker``, routed by prefix, served upstream as ``upstream_model``."""
    return config_from_dict({"models": [{"name": name, "upstream_model": upstream_model, "workers": [worker],
                                         "policy": "prefix"}], "health": {"interval_s": 60}, **top})


def counter(text: str, name: str) -> float:
    """The sum of a metric's series in a /metrics page."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))
