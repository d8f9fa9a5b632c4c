"""tools/profile_router.py's reading of py-spy's raw output, and tools/keys_cold.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "profile_router.py"
RAW = """\
main (router/cli.py:1);run (router/server.py:2);StreamWriter._writelines (aiohttp/http_writer.py:9) 6
main (router/cli.py:1);forward (router/proxy.py:10);ClientSession._request (aiohttp/client.py:5) 3
main (router/cli.py:1);forward (router/proxy.py:12);ClientSession._request (aiohttp/client.py:7) 1
main (router/cli.py:1);select (router/policies/prefix.py:40) 2
"""


@pytest.fixture
def tool():
    spec = importlib.util.spec_from_file_location("profile_router", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_samples_go_to_their_innermost_stage_and_function(tool, tmp_path) -> None:
    raw = tmp_path / "plain.txt"
    raw.write_text(RAW)
    assert dict(tool.breakdown(raw)) == pytest.approx(
        {"aiohttp server": 50.0, "aiohttp client": 100 * 4 / 12, "decide (policy, index)": 100 * 2 / 12})
    assert tool.innermost(raw, 2) == [("StreamWriter._writelines (aiohttp/http_writer.py)", 50.0),
                                      ("ClientSession._request (aiohttp/client.py)", pytest.approx(100 * 4 / 12))]


def test_keys_cold_times_every_stage_both_ways() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(TOOL.parent / "keys_cold.py"), "--requests", "5", "--gap-ms", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert {"chat template", "cut at special tokens", "token ids", "block hashes", "all"} <= set(rows)
    assert "after 1 ms idle" in out
    for name in ("token ids", "all"):
        back_to_back, after_gap = (float(c) for c in rows[name].strip("| ").split(" | ")[1:])
        assert back_to_back > 0 and after_gap > 0
