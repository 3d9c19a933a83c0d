"""The benchmark's arithmetic and rendering on synthetic numbers: speedup, ideal, efficiency, ratios, the
per-round time split, bytes per round, and that the Markdown, CSV and PNG are written and agree."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench import config as bench_config
from bench import report, summary, theory
from bench.peer import PeerRecord, count_generated
from bench.stack_runs import ConfigRun, GenerationRecord, ServerCounters
from specdec.sampling import SamplingParams
from specdec.speedup import expected_tokens_per_round, ideal_speedup

V = 1000
COSTS = theory.Costs(context_length=40, target_step_ms=30.0, draft_step_ms=6.0, verify_ms={1: 36.0, 2: 42.0})
ALPHAS = {"greedy": theory.Alpha(0.8, 100), "sample": theory.Alpha(0.6, 100)}


def record(mode: str, k: int, p: int, wall_ms: float, tokens: int, rounds: int, accepted: int) -> GenerationRecord:
    return GenerationRecord(
        mode=mode, k=k, prompt_index=p, repeat=0, wall_ms=wall_ms, tokens=tokens, output_ids=tuple(range(tokens)),
        rounds=rounds, drafted=k * rounds, accepted=accepted, draft_ms=rounds * k * 6.5, target_ms=rounds * 33.0,
        orchestrator_ms=rounds * 0.5, total_ms=wall_ms - 1.0, fallback_rounds=0, reprefills=0,
    )


def run(mode: str, k: int, ms_per_token: float, rounds: int, triton_ms: float = 30.0) -> ConfigRun:
    tokens = 64
    recs = tuple(record(mode, k, p, ms_per_token * tokens * (1 + 0.1 * p), tokens, rounds, tokens - rounds)
                 for p in range(3))
    servers = ServerCounters(triton_requests=3 * rounds, triton_success_ns=3 * rounds * 31_000_000,
                             triton_compute_ns=int(3 * rounds * triton_ms * 1e6), draft_rounds=3 * rounds if k else 0,
                             draft_round_s=3 * rounds * k * 0.006, draft_q_bytes=3 * rounds * k * 800,
                             triton_output_bytes=3 * rounds * (k + 1) * 800)
    return ConfigRun(mode, k, recs, servers)


@pytest.fixture()
def table() -> summary.Summary:
    runs = [run(m, 0, 34.0, 64, triton_ms=32.0) for m in ("greedy", "sample")]  # served step: drifted from 30
    runs += [run("greedy", 1, 25.0, 36), run("greedy", 2, 22.0, 28), run("sample", 1, 28.0, 40), run("sample", 2, 27.0, 34)]
    peer = [PeerRecord(m, k, p, 0, ms * 64, 64, 64 // (k + 1)) for m in ("greedy", "sample") for k, ms in ((0, 32.0), (1, 27.0), (2, 24.0))
            for p in range(3)]
    return summary.summarize(runs, peer, ALPHAS, COSTS, (1, 2), V, {"target": "synthetic"})


def test_every_row_and_the_ratios(table: summary.Summary) -> None:
    assert {(r.system, r.mode, r.k) for r in table.rows} == {
        (s, m, k) for s in ("specdec", "hf") for m in ("greedy", "sample") for k in (0, 1, 2)
    }
    base = table.row("specdec", "greedy", 0)
    row = table.row("specdec", "greedy", 2)
    assert base.speedup == 1.0
    assert row.ms_per_token == pytest.approx(22.0 * 1.1)  # the median of 1.0x, 1.1x, 1.2x
    assert row.speedup == pytest.approx(base.ms_per_token / row.ms_per_token)
    ideal = ideal_speedup(0.8, 2, 6.0 / 30.0, 42.0 / 30.0)
    assert row.ideal_speedup == pytest.approx(ideal)
    assert row.efficiency == pytest.approx(row.speedup / ideal)
    hf = table.row("hf", "greedy", 2)
    assert row.vs_hf == pytest.approx(hf.ms_per_token / row.ms_per_token)
    assert math.isnan(hf.vs_hf) and hf.tokens_per_round == pytest.approx(64 / 21)
    assert row.tokens_per_round == pytest.approx(64 / 28)
    assert row.tokens_per_round_norm == pytest.approx(64 / 28 / 3)
    assert row.expected_tokens_per_round == pytest.approx(expected_tokens_per_round(0.8, 2))
    assert table.best("specdec", "greedy").k == 2


def test_per_round_split_and_bytes(table: summary.Summary) -> None:
    row = table.row("specdec", "sample", 2)
    assert row.triton_compute_ms == pytest.approx(30.0)
    assert row.triton_ms == pytest.approx(31.0)
    assert row.draft_compute_ms == pytest.approx(12.0)
    assert row.overhead_ms == pytest.approx(row.client_ms - 12.0 - 30.0)
    assert row.overhead_pct == pytest.approx(100 * row.overhead_ms / 30.0)
    assert row.overhead_pct_served == pytest.approx(100 * row.overhead_ms / 32.0)  # the same phase's K = 0 step
    assert row.triton_vs_inprocess == pytest.approx(30.0 / 42.0)  # Triton's 30 ms vs 42 ms in-process for K+1 = 3
    assert row.draft_vs_inprocess == pytest.approx(12.0 / (2 * 6.0))
    assert row.mb_per_round == pytest.approx((2 + 3) * 800 / 1e6)  # the servers' byte counters over the rounds
    assert table.row("specdec", "greedy", 0).mb_per_round == pytest.approx(800 / 1e6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.75, 0.99])
def test_implied_alpha_inverts_the_expectation(alpha: float) -> None:
    assert summary.implied_alpha(expected_tokens_per_round(alpha, 4), 4) == pytest.approx(alpha, abs=1e-6)
    assert math.isnan(summary.implied_alpha(1.0, 0))


def test_report_files_agree(table: summary.Summary, tmp_path) -> None:
    paths = report.write_report(table, tmp_path / "out", title="synthetic")
    assert paths["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with paths["csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(table.rows)
    first = next(r for r in rows if (r["system"], r["mode"], r["k"]) == ("specdec", "sample", "1"))
    assert float(first["efficiency"]) == pytest.approx(table.row("specdec", "sample", 1).efficiency)
    text = paths["markdown"].read_text()
    for r in table.rows:
        assert f"| {r.system} | {r.mode} | {r.k} | {r.ms_per_token:.1f} (" in text
    assert "efficiency" in text and "bench.png" in text and "best K = 2" in text


def test_quick_flag_shrinks_the_budget() -> None:
    cfg = bench_config.parse_args(["--quick", "--out-dir", "x"])
    assert cfg.all_ks == (0, 1, 2) and cfg.max_new_tokens <= 16 and cfg.out_dir == "x"
    cfg = bench_config.parse_args(["--ks", "4,1,2", "--modes", "sample", "--top-p", "0.9"])
    assert cfg.ks == (1, 2, 4) and cfg.modes == ("sample",)
    assert cfg.sampling("sample") == SamplingParams(temperature=0.8, top_p=0.9)
    assert cfg.sampling("greedy").greedy
    with pytest.raises(SystemExit):
        bench_config.parse_args(["--ks", "0,1"])


def test_alpha_of_a_model_with_itself_is_one_and_the_cost_probe_times_every_k() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = theory.generate(model, [1, 2, 3], 10, SamplingParams(temperature=1.0), seed=0)
    assert len(ids) == 13
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.9)):
        alpha = theory.measure_alpha(model, model, [(ids, 3)], params)
        assert alpha.positions == 10 and alpha.mean == pytest.approx(1.0, abs=1e-5)
    probe = theory.CostProbe(model, model, ids)
    greedy = SamplingParams(temperature=0.0)
    for k in (0, 1, 2):
        probe.warm("greedy", greedy, k, ids, 0)
        probe.measure("greedy", greedy, k, ids, 0, 0)
    with pytest.raises(ValueError, match=r"no cost samples for K = \[3\]"):
        probe.costs([1, 2, 3])
    costs = probe.costs([1, 2])
    probe.close()
    assert costs.target_step_ms > 0 and costs.draft_step_ms > 0 and set(costs.verify_ms) == {1, 2}
    assert costs.context_length == len(ids) and costs.verify_cost_ratio(0) == 1.0


def test_count_generated_stops_at_eos() -> None:
    assert count_generated([5, 6, 2, 2, 2], eos_token_id=2) == 3
    assert count_generated([5, 6, 7], eos_token_id=2) == 3
