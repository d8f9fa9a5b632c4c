"""tools/profile_router.py's reading of py-spy's raw output: stages and innermost functions."""

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
