"""`python -m bench --quick` end to end: the real stack processes (Triton, draft service, orchestrator) on a tiny
random model, the HF peer, the theory and the report, run as a user runs it (python -m bench, a subprocess).

No timing asserts: this is the smoke test that keeps the benchmark from rotting. It fails if the run fails,
or if the table misses a row, a ratio is not a number, or the efficiency was not computed.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SYSTEMS = ("specdec", "hf")
MODES = ("greedy", "sample")
KS = (0, 1, 2)
QUICK_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench-out")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out-dir", str(out)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, f"bench --quick failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return out, done.stdout


def finite(value: str) -> float:
    number = float(value)
    assert math.isfinite(number), value
    return number


def test_outputs_exist_and_are_announced(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    for name in ("bench.md", "bench.csv", "bench.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        assert str(path) in stdout
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for service in ("triton", "draft", "orchestrator"):
        assert (out / "logs" / f"{service}.log").is_file()


def test_every_row_is_present_with_finite_ratios(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    with (out / "bench.csv").open() as handle:
        rows = {(r["system"], r["mode"], int(r["k"])): r for r in csv.DictReader(handle)}
    assert set(rows) == {(s, m, k) for s in SYSTEMS for m in MODES for k in KS}
    for (system, mode, k), row in rows.items():
        assert finite(row["ms_per_token"]) > 0
        assert finite(row["ms_per_token_q1"]) <= finite(row["ms_per_token"]) <= finite(row["ms_per_token_q3"])
        assert finite(row["tokens_per_s"]) > 0
        speedup = finite(row["speedup"])
        assert speedup > 0 and (k > 0 or speedup == 1.0)
        assert int(row["tokens"]) == int(row["generations"]) * QUICK_NEW_TOKENS  # the tiny model never stops early
        if k > 0:
            ideal = finite(row["ideal_speedup"])
            assert finite(row["efficiency"]) == pytest.approx(speedup / ideal, rel=1e-9)
        if system == "specdec":
            assert finite(row["vs_hf"]) > 0
            assert 1.0 <= finite(row["tokens_per_round"]) <= k + 1
            finite(row["overhead_pct"])
            assert finite(row["triton_compute_ms"]) > 0 and finite(row["client_ms"]) > 0
            assert int(row["fallback_rounds"]) == 0
            if k > 0:
                assert 0.0 <= finite(row["acceptance_rate"]) <= 1.0
                assert finite(row["draft_compute_ms"]) > 0
            # Measured by the servers' byte counters. Greedy: up to K+1 one-hot target rows (fewer in a last
            # round that drafts less), packed as one (value, token id) pair each, and no q. Sampling: never
            # more than dense q and p rows.
            if mode == "greedy":
                assert 8 / 1e6 <= finite(row["mb_per_round"]) <= (k + 1) * 8 / 1e6 + 1e-12
                assert k > 0 or finite(row["mb_per_round"]) == pytest.approx(8 / 1e6)
            else:
                assert 0 < finite(row["mb_per_round"]) <= (k + k + 1) * 272 * 4 / 1e6


def test_markdown_table_is_well_formed(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    text = (out / "bench.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = next(line for line in lines if line.startswith("| system |"))
    width = header.count("|")
    body = [line for line in lines if line.startswith(("| specdec |", "| hf |"))]
    assert len(body) == len(SYSTEMS) * len(MODES) * len(KS)
    assert all(line.count("|") == width for line in body)
    assert "efficiency" in header
    for mode in MODES:
        assert f"**{mode}**, best K = " in text
        assert "α = " in text
    assert "![" in text and "bench.png" in text


def test_quick_sweep_ranks_every_draft(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--sweep", "--out-dir", str(tmp_path)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"bench --quick --sweep failed ({done.returncode}):\n{done.stderr[-4000:]}"
    with (tmp_path / "sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["name"], r["dtype"]) for r in rows} == {
        (name, dtype) for name in ("first 2", "skip 1") for dtype in ("float32", "bfloat16")
    }
    scores = [finite(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)  # ranked best first
    for row in rows:
        assert 0.0 <= finite(row["alpha_greedy"]) <= 1.0 and 0.0 <= finite(row["alpha_sample"]) <= 1.0
        assert finite(row["c"]) > 0 and finite(row["ideal_greedy"]) > 0 and finite(row["ideal_sample"]) > 0
    best = rows[0]
    assert f"--draft-layers {best['layers']} --draft-dtype {best['dtype']}" in (tmp_path / "sweep.md").read_text()
