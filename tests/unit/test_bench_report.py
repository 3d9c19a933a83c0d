"""The benchmark's arithmetic and rendering on synthetic records: paired speedups and their intervals, the
calibration's choice, the model draft's served costs and ideal, the load table, the goals, and that the
Markdown, CSV and PNG files are written and agree."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench import config as bench_config
from bench import goals, report, single, summary, theory
from bench.arms import HF, HF_PLAIN, PROMPT_LOOKUP, SPECDEC, TARGET_ONLY, Arm, Record
from bench.client import Occupancy
from bench.load import CancelRun, Cell
from bench.peer import count_generated
from bench.stats import clustered_ratio, paired_ratio, rate
from specdec.sampling import SamplingParams
from specdec.speedup import expected_tokens_per_round

SUFFIX4 = Arm(SPECDEC, "suffix", 4)
SUFFIX_AUTO = Arm(SPECDEC, "suffix", None)
LOOKUP4 = Arm(HF, PROMPT_LOOKUP, 4)


def rec(arm: Arm, item: int, ms_per_token: float, phase: str = "single", workload: str = "code-edit",
        mode: str = "greedy", tokens: int = 64, **fields) -> Record:
    return Record(phase=phase, workload=workload, mode=mode, arm=arm.label, item=item, tokens=tokens,
                  wall_ms=ms_per_token * tokens, output_ids=tuple(range(tokens)), **fields)


def test_arms_are_labelled_and_invalid_ones_refused() -> None:
    assert [a.label for a in (TARGET_ONLY, SUFFIX4, SUFFIX_AUTO, HF_PLAIN, LOOKUP4)] == [
        "target-only", "suffix K=4", "suffix auto", "HF generate", "HF prompt lookup 4"]
    assert Arm(SPECDEC, "model", 2, coupled=True).label == "model K=2 coupled"
    for bad in ({"system": "vllm"}, {"system": HF, "drafter": PROMPT_LOOKUP, "k": 0}, {"system": HF, "k": 3},
                {"system": SPECDEC, "k": 3}):
        with pytest.raises(ValueError):
            Arm(**bad)


def test_paired_ratio_is_the_ratio_of_aggregate_rates_with_an_interval_around_it() -> None:
    a = [(64, 1.0), (64, 1.2), (32, 0.4), (64, 0.9)]
    b = [(64, 2.0), (64, 2.2), (32, 1.0), (64, 2.1)]
    estimate = paired_ratio(a, b)
    assert estimate.value == pytest.approx(rate([t for t, _ in a], [s for _, s in a]) / (224 / 7.3))
    assert estimate.low <= estimate.value <= estimate.high and estimate.high - estimate.low > 0
    same = paired_ratio(a, a)
    assert (same.value, same.low, same.high) == (1.0, 1.0, 1.0)  # pairing: an arm against itself has no spread
    with pytest.raises(ValueError, match="equal lengths"):
        paired_ratio(a, b[:2])
    assert math.isnan(paired_ratio([], []).value)


def test_clustered_ratio_takes_its_interval_from_the_rounds_not_the_generations() -> None:
    # Two rounds, 8 generations each: within a round every generation of arm a runs 0.8x or 1.25x arm b's
    # time (the machine's state that round), so generation by generation the ratio looks certain.
    b = [(64, 1.0)] * 16
    a = [(64, 0.8)] * 8 + [(64, 1.25)] * 8
    rounds = [0] * 8 + [1] * 8
    estimate = clustered_ratio(a, b, rounds)
    assert estimate.value == pytest.approx(rate([64] * 16, [0.8] * 8 + [1.25] * 8) / 64)
    assert estimate.low < 0.5 and estimate.high > 2.0  # two rounds that disagree: t with one degree of freedom
    narrow = paired_ratio(a, b)
    assert narrow.high - narrow.low < estimate.high - estimate.low  # what the bootstrap over generations says
    steady = clustered_ratio([(64, 0.5)] * 16, b, rounds)  # rounds that agree: no spread
    assert (steady.value, steady.low, steady.high) == pytest.approx((2.0, 2.0, 2.0))
    alone = clustered_ratio(a, b, [0] * 16)
    assert math.isnan(alone.low) and math.isnan(alone.high)
    with pytest.raises(ValueError, match="equal lengths"):
        clustered_ratio(a, b, rounds[:3])


def test_calibration_picks_the_fastest_fixed_k() -> None:
    records = [rec(Arm(SPECDEC, "suffix", k), i, ms, phase="calibration")
               for k, ms in ((2, 30.0), (4, 20.0), (8, 25.0)) for i in range(2)]
    records += [rec(Arm(HF, PROMPT_LOOKUP, k), i, ms, phase="calibration") for k, ms in ((2, 15.0), (4, 18.0))
                for i in range(2)]
    assert single.best_fixed_k(records, "code-edit", "greedy", "suffix", (2, 4, 8)) == 4
    assert single.best_fixed_k(records, "code-edit", "greedy", PROMPT_LOOKUP, (2, 4)) == 2
    arms = single.single_arms(bench_config.BenchConfig(), "code-edit", "greedy",
                              {("code-edit", "greedy", "suffix"): 4, ("code-edit", "greedy", PROMPT_LOOKUP): 2}, True)
    assert [a.label for a in arms] == ["target-only", "suffix K=4", "suffix auto", "ngram auto", "hybrid auto",
                                       "model auto", "HF generate", "HF prompt lookup 2"]


def single_results() -> summary.Results:
    records = []
    for i in range(6):
        slow = 1 + 0.1 * i  # prompts differ; the arms' ratio is fixed per prompt
        records += [rec(TARGET_ONLY, i, 40.0 * slow, rounds=64), rec(SUFFIX4, i, 16.0 * slow, rounds=20, drafted=70,
                                                                       accepted=44),
                    rec(SUFFIX_AUTO, i, 17.0 * slow, rounds=22, drafted=60, accepted=42, off_rounds=2,
                        rounds_by_k=(2, 0, 0, 0, 20)),
                    rec(HF_PLAIN, i, 38.0 * slow, rounds=64), rec(LOOKUP4, i, 20.0 * slow, rounds=30)]
    return summary.Results(records=records, best={("code-edit", "greedy", "suffix"): 4})


def test_single_table_speedups_tokens_per_round_and_auto_columns() -> None:
    table = summary.single_table(single_results(), "code-edit", "greedy")
    rows = {row[0]: row for row in table.rows}
    assert rows["suffix K=4"][3].value == pytest.approx(40 / 16)  # vs target-only
    assert rows["suffix K=4"][4].value == pytest.approx(38 / 16)  # vs HF generate
    assert rows["suffix K=4"][5].value == pytest.approx(20 / 16)  # vs HF's best prompt lookup
    assert rows["suffix K=4"][6] == pytest.approx(64 / 20) and rows["suffix K=4"][7] == pytest.approx(44 / 70)
    assert rows["suffix auto"][8] == pytest.approx(2 / 22) and rows["suffix auto"][9] == pytest.approx(80 / 22)
    assert rows["target-only"][3].value == 1.0 and rows["suffix K=4"][8] == "–"


def test_goals_report_measured_figures_and_whether_they_are_met() -> None:
    results = single_results()
    checked = {g.text: g for g in goals.goals(results)}
    best = checked["code-edit, greedy: best drafter arm (suffix K=4) vs target-only"]
    assert best.value.value == pytest.approx(2.5) and best.met  # goal: 2.0
    auto = checked["code-edit, greedy: suffix auto vs its best fixed K (4)"]
    assert auto.value.value == pytest.approx(16 / 17) and not auto.met  # 0.94 < 0.95
    serving = checked["all workloads, greedy: target-only through the stack vs HF generate"]
    assert serving.value.value == pytest.approx(38 / 40) and serving.met
    identical = next(g for g in checked.values() if g.text.startswith("greedy output identical"))
    assert identical.met
    results.records[1] = rec(SUFFIX4, 0, 16.0, rounds=20, tokens=64)  # same length, different tokens:
    results.records[1] = Record(**{**results.records[1].__dict__, "output_ids": (9,) * 64})
    assert summary.greedy_matches(results.records) == (11, 12)


def test_suffix_cache_phase_table_and_goals() -> None:
    """History, then pass 1 beside target-only and HF prompt lookup, then pass 2: each pass's figures, the
    cache readings after each stage, and the two goals computed from them."""
    def he(arm: Arm, item: int, ms: float, phase: str) -> Record:
        return rec(arm, item, ms, phase=phase, workload="humaneval", accepted=1, drafted=4)

    records = [he(SUFFIX4, 20 + i, 30.0, "history") for i in range(3)]
    for i in range(4):
        records += [he(TARGET_ONLY, i, 60.0, "pass 1"), he(SUFFIX4, i, 30.0, "pass 1"), he(LOOKUP4, i, 40.0, "pass 1")]
    for i in range(4):
        records += [he(TARGET_ONLY, i, 60.0, "pass 2"), he(SUFFIX4, i, 20.0, "pass 2")]
    results = summary.Results(records=records, suffix_cache_bound=1000,
                              suffix_cache={"history": (10, 4000), "pass 1": (30, 12000), "pass 2": (31, 12400)})
    table = summary.two_pass_table(results)
    assert table.headers[3] == "vs HF prompt lookup 4"
    history, first, second, ratio = table.rows
    assert history[0] == "history: 3 other problems" and history[5:] == (10, 0.004)
    assert first[2].value == pytest.approx(2.0) and first[3].value == pytest.approx(40 / 30) and first[5] == 30
    assert second[2].value == pytest.approx(3.0) and second[3] == "–"
    assert ratio[2].value == pytest.approx(1.5)
    checked = {g.text: g for g in goals.goals(results)}
    warm = checked["humaneval, greedy: suffix K=4 after serving 3 other problems (pass 1) vs HF's best "
                   "(HF prompt lookup 4)"]
    assert warm.value.value == pytest.approx(40 / 30) and warm.met
    assert checked["suffix cache: pass 2 vs pass 1 tokens/s"].value.value == pytest.approx(1.5)


def test_model_rows_take_costs_as_served_and_compute_the_ideal() -> None:
    records = []
    for i in range(3):
        records.append(rec(TARGET_ONLY, i, 40.0, phase="model", workload="readme+open", rounds=64, target_ms=64 * 38.0))
        records.append(rec(Arm(SPECDEC, "model", 2), i, 50.0, phase="model", workload="readme+open", rounds=32,
                           drafted=64, accepted=32, draft_ms=32 * 38.0, target_ms=32 * 45.6))
    results = summary.Results(records=records, alphas={"greedy": 0.6})
    (row,) = summary.model_rows(results)
    assert row.c == pytest.approx(38.0 / (2 * 38.0)) and row.v == pytest.approx(45.6 / 38.0)
    assert row.ideal == pytest.approx(expected_tokens_per_round(0.6, 2) / (2 * 0.5 + 1.2))
    assert row.speedup.value == pytest.approx(0.8) and row.efficiency == pytest.approx(0.8 / row.ideal)
    assert row.acceptance == pytest.approx(0.5) and row.tokens_per_round == pytest.approx(2.0)


def load_results() -> summary.Results:
    results = summary.Results()
    for c, base_ms in ((1, 40.0), (8, 90.0)):
        for arm, factor in ((TARGET_ONLY, 1.0), (SUFFIX_AUTO, 0.5)):
            records = [rec(arm, i, base_ms * factor, phase="load", concurrency=c) for i in range(max(4, c))]
            results.records += records
            wall = sum(r.wall_ms for r in records) / 1e3 / c
            results.cells.append(Cell("code-edit", arm.label, c, len(records), sum(r.tokens for r in records), wall,
                                      forwards=100.0, forward_sequences=100.0 * min(c, 6), rounds=2 if c > 1 else 1))
    idle = Occupancy(0, 0, 0, 0, 0, 0)
    results.cancel = CancelRun(8, 4, 6, 2, 0, idle, Occupancy(4, 1e6, 3, 2e5, 0, 0), idle, 0.5)
    return results


def test_load_table_and_goals() -> None:
    results = load_results()
    rows = {(row[1], row[2]): row for row in summary.load_table(results).rows}
    assert rows[("target-only", 8)][5] == pytest.approx(8 * 40 / 90)  # vs c=1
    assert rows[("target-only", 8)][6] == pytest.approx(90.0)  # p50 ms/token
    assert rows[("target-only", 8)][8] == pytest.approx(6.0)  # sequences per forward
    assert rows[("suffix auto", 8)][9].value == pytest.approx(2.0)  # vs target-only at the same c
    assert (rows[("suffix auto", 8)][9].low, rows[("suffix auto", 8)][9].high) == pytest.approx((2.0, 2.0))  # 2 rounds
    assert math.isnan(rows[("suffix auto", 1)][9].low)  # one round: no interval from its spread
    checked = {g.text: g for g in goals.goals(results)}
    assert checked["load code-edit, target-only: tokens/s at c=8 vs c=1"].value.value == pytest.approx(320 / 90)
    latency = checked["load code-edit, target-only: p50 ms/token at c=8 vs c=1 (at most 2)"]
    assert latency.value.value == pytest.approx(90 / 40) and not latency.met
    assert checked["after the cancellation run: zero live sequences, KV memory back to idle"].met
    results.cancel = CancelRun(8, 4, 6, 2, 0, results.cancel.before, results.cancel.peak,
                               Occupancy(1, 5e5, 0, 0, 0, 0), 60.0)
    assert not {g.text: g for g in goals.goals(results)}[
        "after the cancellation run: zero live sequences, KV memory back to idle"].met


def test_report_files_agree(tmp_path) -> None:
    results = single_results()
    loaded = load_results()
    results.records += loaded.records
    results.cells, results.cancel = loaded.cells, loaded.cancel
    results.settings = {"machine": "test"}
    paths = report.write_report(results, tmp_path, "synthetic")
    text = paths["markdown"].read_text()
    assert "## Goals" in text and "![bench.png](bench.png)" in text and "![load.png](load.png)" in text
    assert "| suffix K=4 | 6 | " in text and "2.50 [" in text and "**machine**: test" in text
    for name in ("figure", "load figure"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with paths["records"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(results.records) and {r["arm"] for r in rows} >= {"suffix K=4", "HF prompt lookup 4"}
    with paths["load"].open() as handle:
        assert len(list(csv.DictReader(handle))) == len(results.cells)


def test_flags_and_the_quick_budget() -> None:
    cfg = bench_config.parse_args(["--quick", "--out-dir", "x"])
    assert cfg.max_new_tokens <= 16 and cfg.out_dir == "x" and cfg.prompts_per_workload <= 2
    cfg = bench_config.parse_args(["--ks", "8,2", "--modes", "sample", "--top-p", "0.9", "--phases", "load"])
    assert cfg.ks == (2, 8) and cfg.modes == ("sample",) and cfg.phases == ("load",)
    assert cfg.sampling("sample") == SamplingParams(temperature=0.8, top_p=0.9)
    assert cfg.sampling("greedy").greedy
    for bad in (["--ks", "0,1"], ["--ks", "17"], ["--phases", "warp"], ["--workloads", "poetry"]):
        with pytest.raises(SystemExit):
            bench_config.parse_args(bad)


def test_alpha_of_a_model_with_itself_is_one() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = theory.generate(model, [1, 2, 3], 10, SamplingParams(temperature=1.0), seed=0)
    assert len(ids) == 13
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.9)):
        alpha = theory.measure_alpha(model, model, [(ids, 3)], params)
        assert alpha.positions == 10 and alpha.mean == pytest.approx(1.0, abs=1e-5)


def test_count_generated_stops_at_eos() -> None:
    assert count_generated([5, 6, 2, 2, 2], eos_token_id=2) == 3
    assert count_generated([5, 6, 7], eos_token_id=2) == 3


def test_after_a_restart_the_bench_waits_until_a_generation_drafts_without_a_fallback(monkeypatch) -> None:
    from bench import runner

    class Systems:
        def __init__(self, fallbacks: list[int]) -> None:
            self.fallbacks, self.arms = fallbacks, []

        def run(self, arm, prompt_ids, params, seed, max_new_tokens=None, **labels):  # noqa: ANN001, ANN201
            self.arms.append(arm)
            return Record(phase="warm-up", workload="", mode="greedy", arm=arm.label, item=-1, wall_ms=1.0, tokens=8,
                          fallback_rounds=self.fallbacks.pop(0))

    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    config = bench_config.parse_args(["--quick"])
    systems = Systems([1, 1, 0, 1])
    runner._until_the_draft_answers(systems, config, [1, 2, 3])
    assert len(systems.arms) == 3 and all(a.drafter == "suffix" and a.k for a in systems.arms)
    with pytest.raises(RuntimeError, match="did not reach the restarted draft service"):
        runner._until_the_draft_answers(Systems([1] * 5), config, [1, 2, 3], timeout_s=-1.0)
