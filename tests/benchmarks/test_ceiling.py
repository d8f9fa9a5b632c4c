"""The pooled-cache ceiling: Belady's eviction and LRU on hand-made request streams."""

import json
import random

import pytest

from kvroute.benchmarks.ceiling import ceiling, lru_hits, main, opt_hits

BS = 4


def group(g: int, blocks: int, tail: int) -> tuple[tuple[int, ...], int]:
    """A prompt of group ``g``'s ``blocks`` shared blocks and one unique tail block."""
    base = g * 100
    return tuple(base + i for i in range(blocks)) + (10**9 + tail,), (blocks + 1) * BS


def test_lru_and_opt_on_alternating_groups():
    # A, B, A, B with room for one group's blocks: LRU always evicts the one needed next.
    a1, a2, b1, b2 = group(1, 2, 1), group(1, 2, 2), group(2, 2, 3), group(2, 2, 4)
    reqs = [a1, b1, a2, b2]
    assert lru_hits(reqs, 3, BS) == 0
    # Belady keeps A's blocks through B (used again sooner), so the second A hits 2 blocks;
    # then A is never used again, so B's first block (kept over A's) gives the second B 1.
    assert opt_hits(reqs, 3, BS) == 3 * BS


def test_everything_fits():
    reqs = [group(1, 3, i) for i in range(5)]
    # the first request misses; each later one hits its 3 shared blocks
    assert lru_hits(reqs, 100, BS) == opt_hits(reqs, 100, BS) == 4 * 3 * BS


def test_last_token_is_always_computed():
    keys = (1, 2, 3)
    reqs = [(keys, 3 * BS), (keys, 3 * BS)]  # the same prompt twice, exactly 3 blocks long
    assert lru_hits(reqs, 10, BS) == opt_hits(reqs, 10, BS) == 2 * BS


def test_opt_bounds_lru_on_random_streams():
    rng = random.Random(7)
    for _ in range(20):
        reqs = [group(rng.randrange(8), rng.randrange(1, 6), i) for i in range(120)]
        for cap in (4, 10, 25):
            opt, lru = opt_hits(reqs, cap, BS), lru_hits(reqs, cap, BS)
            assert opt >= lru
            assert opt <= opt_hits(reqs, cap + 5, BS)  # more room never hurts the optimum


def test_ceiling_summary_and_cli(tmp_path):
    # Three groups in turn, room for two groups' shared blocks: LRU always evicts the group
    # needed next and never hits; Belady keeps the two used next, so from the fourth
    # request on two in three (18 of 27) hit their 4 shared blocks.
    reqs = [group(i % 3, 4, i) for i in range(30)]
    summary = ceiling(reqs, 8, BS)
    assert summary["distinct_blocks"] == 3 * 4 + 30 and summary["prompt_tokens"] == 30 * 5 * BS
    assert summary["capacity_over_blocks"] == round(8 / 42, 3)
    assert summary["lru_hit_rate"] == 0.0
    assert summary["opt_hit_rate"] == round(18 * 4 * BS / (30 * 5 * BS), 4)

    out = tmp_path / "c"
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"routers": {"prefix": {"hit_rate": 0.5}}}))
    rc = main(["--workers", "2", "--results", str(results), "--kv-blocks", "40", "--tokenization", "words",
               "--workload", "shared-prefix", "--requests", "24", "--groups", "3",
               "--prefix-tokens", "200", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "ceiling.json").read_text())
    assert doc["requests"] == 24 and doc["ceiling"]["capacity_blocks"] == 80
    rates = [c["opt_hit_rate"] for c in doc["curve"]]
    assert rates == sorted(rates)  # the optimum grows with the cache
    md = (out / "ceiling.md").read_text()
    assert (out / "ceiling.png").stat().st_size > 0 and "(this fleet)" in md
    assert doc["measured"] == {"prefix": 0.5} and "| prefix | 0.500 |" in md


def test_bad_results_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "r.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit) as exc:
        main(["--results", str(bad), "--out", str(tmp_path / "c")])
    assert exc.value.code == 2 and "not a bench results.json" in capsys.readouterr().err


def test_missing_trace_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--workload", "trace", "--trace", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "c")])
    assert exc.value.code == 2 and "--workload trace" in capsys.readouterr().err
