"""`python -m bench --quick` end to end: the real stack processes (Triton, draft service, orchestrator) on a tiny
random model, the HF peer, every phase and the report, run as a user runs it (python -m bench, a subprocess).

No timing asserts: this is the smoke test that keeps the benchmark from rotting. It fails if the run fails,
if a phase, workload, arm or figure is missing, or if a property that holds whatever the timings does not:
greedy output identical to target-only for every drafter, no sequence left behind after the cancellations,
the suffix cache learning from its serving history and the first pass, every load cell measured.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = ("readme", "humaneval", "code-edit", "open")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench-out")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out-dir", str(out)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, f"bench --quick failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return out, done.stdout


@pytest.fixture(scope="module")
def records(quick_run: tuple[Path, str]) -> list[dict[str, str]]:
    with (quick_run[0] / "records.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_outputs_exist_and_are_announced(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    for name in ("bench.md", "records.csv", "load.csv", "bench.png", "load.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        assert str(path) in stdout
    for name in ("bench.png", "load.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for service in ("triton", "draft", "orchestrator"):
        assert (out / "logs" / f"{service}.log").is_file()


def test_every_phase_workload_and_arm_is_measured(records: list[dict[str, str]]) -> None:
    phases = {r["phase"] for r in records}
    assert {"calibration", "single", "model", "load", "history", "pass 1", "pass 2"} <= phases
    first_pass = {r["arm"] for r in records if r["phase"] == "pass 1"}
    assert "target-only" in first_pass and any(a.startswith("suffix K=") for a in first_pass) and any(
        a.startswith("HF prompt lookup") for a in first_pass)
    measured = {r["item"] for r in records if r["phase"] in ("single", "calibration") and r["workload"] == "humaneval"}
    assert measured and not measured & {r["item"] for r in records if r["phase"] == "history"}
    for workload in WORKLOADS:
        for mode in ("greedy", "sample"):
            arms = {r["arm"] for r in records if (r["phase"], r["workload"], r["mode"]) == ("single", workload, mode)}
            expected = {"target-only", "suffix auto", "ngram auto", "hybrid auto", "model auto", "HF generate"}
            assert expected <= arms, (workload, mode, arms)
            if workload != "readme":  # calibrated fixed Ks and HF prompt lookup
                assert any(a.startswith("suffix K=") for a in arms) and any(a.startswith("HF prompt lookup") for a in arms)
    model_arms = {r["arm"] for r in records if r["phase"] == "model"}
    assert {"target-only", "model K=1", "model K=1 coupled", "model auto"} <= model_arms
    for r in records:
        assert int(r["tokens"]) > 0 and float(r["wall_ms"]) > 0
        assert int(r["fallback_rounds"]) == 0 and int(r["reprefills"]) == 0


def test_load_cells_cover_every_concurrency_in_rounds(quick_run: tuple[Path, str],
                                                    records: list[dict[str, str]]) -> None:
    with (quick_run[0] / "load.csv").open() as handle:
        cells = list(csv.DictReader(handle))
    assert {(c["arm"], int(c["concurrency"])) for c in cells} >= {
        (arm, c) for arm in ("target-only", "suffix auto") for c in (1, 4)}
    for cell in cells:  # --quick: 2 rounds of max(4, 2c) generations, the same items for every arm
        generations = 2 * max(4, 2 * int(cell["concurrency"]))
        assert int(cell["generations"]) == generations and float(cell["tokens_per_s"]) > 0
        assert 1.0 <= float(cell["sequences_per_forward"]) <= int(cell["concurrency"])
        assert int(cell["rounds"]) == 2 and float(cell["forward_s"]) > 0 and 0 < float(cell["busy"]) <= 1
        assert 0 <= float(cell["lookup_accepted"]) <= float(cell["lookup_drafted"])
        assert 0 <= float(cell["reused_tokens"]) <= float(cell["prompt_tokens"])
        assert float(cell["prompt_tokens"]) >= generations  # the target's prefix cache is on by default
        if cell["arm"] == "target-only":  # K = 0: its decodes never look up drafts on the target
            assert float(cell["lookup_drafted"]) == 0
        items = [int(r["item"]) for r in records if (r["phase"], r["arm"], r["concurrency"]) == (
            "load", cell["arm"], cell["concurrency"])]
        assert sorted(items) == list(range(generations))


def test_properties_that_hold_whatever_the_timings(quick_run: tuple[Path, str]) -> None:
    text = (quick_run[0] / "bench.md").read_text()
    goals = [line for line in text.splitlines() if line.startswith("| #")]
    assert len(goals) >= 20 and all(line.count("|") == 6 for line in goals)
    identical = next(line for line in goals if "greedy output identical to target-only" in line)
    assert identical.rstrip().endswith("| yes |"), identical
    no_leak = next(line for line in goals if "zero live sequences" in line)
    assert no_leak.rstrip().endswith("| yes |"), no_leak
    two_pass = text[text.index("### The suffix drafter's cross-request cache"):]
    history = next(line for line in two_pass.splitlines() if line.startswith("| history: "))
    first = next(line for line in two_pass.splitlines() if line.startswith("| pass 1 |"))
    learnt = [int(row.split("|")[6].replace(",", "")) for row in (history, first)]
    assert 0 < learnt[0] <= learnt[1]  # the cache learnt from the history and kept it through the first pass
    assert any("after serving 2 other problems (pass 1) vs HF's best" in line for line in goals)


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
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)  # ranked best first
    best = rows[0]
    assert f"--draft-layers {best['layers']} --draft-dtype {best['dtype']}" in (tmp_path / "sweep.md").read_text()
