"""The figures the open issues ask the benchmark for, each with its interval and whether it is met.

Why this module exists: the report opens with these, and the closing notes quote them; keeping the list of
goals apart from the tables (`bench.summary`) keeps each file about one thing. Every figure is computed by
the summary's functions from the run's records, so a goal and its table cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.arms import HF_PLAIN, SPECDEC, TARGET_ONLY, Arm
from bench.single import LOOKUP_DRAFTERS
from bench.stats import Estimate
from bench.summary import (
    Results,
    arms_of,
    best_hf_arm,
    best_specdec_arm,
    cell_of,
    greedy_matches,
    load_ratio,
    p50_ms_per_token,
    paired,
    select,
    tokens_per_s,
    two_pass_table,
)


@dataclass(frozen=True)
class Goal:
    """One figure an issue asks for: what, the measured value (with its interval), and whether it is met."""

    issue: int
    text: str
    value: Estimate
    threshold: float
    met: bool



def goals(results: Results) -> list[Goal]:
    """The figures the issues ask for, each with its interval and whether it is met."""
    out: list[Goal] = []
    rec = results.records
    single = select(rec, phase="single")

    def add(issue: int, text: str, value: Estimate, threshold: float, use_low: bool = False) -> None:
        measured = value.low if use_low and math.isfinite(value.low) else value.value
        out.append(Goal(issue, text, value, threshold, math.isfinite(measured) and measured >= threshold))

    for mode in dict.fromkeys(r.mode for r in single):
        for drafter in ("suffix", "model"):
            add(12, f"README prompts, {mode}: {drafter} auto vs target-only",
                paired(single, f"{drafter} auto", TARGET_ONLY.label, workload="readme", mode=mode), 0.95)
        for workload in dict.fromkeys(r.workload for r in single):
            here = select(single, workload=workload, mode=mode)
            for drafter in LOOKUP_DRAFTERS:
                k = results.best.get((workload, mode, drafter))
                if k is None:
                    continue
                fixed = Arm(SPECDEC, drafter, k).label
                if paired(here, fixed, TARGET_ONLY.label).value > 1:
                    add(12, f"{workload}, {mode}: {drafter} auto vs its best fixed K ({k})",
                        paired(here, f"{drafter} auto", fixed), 0.95)
        add(12, f"all workloads, {mode}: target-only through the stack vs HF generate",
            paired(single, TARGET_ONLY.label, HF_PLAIN.label, mode=mode), 0.95)
    for workload in dict.fromkeys(c.workload for c in results.cells):
        top = max(c.concurrency for c in results.cells if c.workload == workload)
        arms = arms_of(select(rec, phase="load", workload=workload, concurrency=top))
        auto = next((a for a in arms if a.endswith("auto")), None)
        if auto is None:
            continue
        rivals = [a for a in arms if a != auto]
        better = max(rivals, key=lambda a: cell_of(results, workload, a, top).tokens_per_s)
        add(12, f"load c={top}, {workload}: auto vs the better of target-only and the best fixed K ({better})",
            load_ratio(results, workload, auto, better, top), 0.95)

    code = {m: select(single, workload="code-edit", mode=m) for m in ("greedy", "sample")}
    for mode, threshold in (("greedy", 2.0), ("sample", 1.4)):
        if code[mode]:
            best = best_specdec_arm(code[mode])
            add(13, f"code-edit, {mode}: best drafter arm ({best}) vs target-only",
                paired(code[mode], best, TARGET_ONLY.label), threshold)
    human = select(single, workload="humaneval", mode="greedy")
    if human:
        best = best_specdec_arm(human)
        add(13, f"HumanEval, greedy: best drafter arm ({best}) vs target-only", paired(human, best, TARGET_ONLY.label), 1.3)
    for workload in ("humaneval", "code-edit", "open"):
        for mode in ("greedy", "sample"):
            here = select(single, workload=workload, mode=mode)
            hf_best = best_hf_arm(here)
            ours = best_specdec_arm(here)
            if hf_best and ours:
                hf_top = max((hf_best, HF_PLAIN.label), key=lambda a: tokens_per_s(select(here, arm=a)))
                add(13, f"{workload}, {mode}: our best ({ours}; suffix cache off) vs HF's best ({hf_top})",
                    paired(here, ours, hf_top), 1.0)
    for mode in ("greedy", "sample"):
        here = select(single, workload="open", mode=mode)
        if here:
            add(13, f"open, {mode}: suffix auto (the default) vs target-only",
                paired(here, "suffix auto", TARGET_ONLY.label), 0.95)
    first = select(rec, phase="pass 1")
    hf_first, suffix_first = best_hf_arm(first), best_specdec_arm(first)
    if hf_first and suffix_first:
        served = len(select(rec, phase="history"))
        add(13, f"humaneval, greedy: {suffix_first} after serving {served} other problems (pass 1) vs HF's best "
                f"({hf_first})", paired(first, suffix_first, hf_first), 1.0)
    two = two_pass_table(results).rows
    if two and two[-1][0] == "pass 2 / pass 1":
        add(13, "suffix cache: pass 2 vs pass 1 tokens/s", two[-1][2], 1.0)
    same, compared = greedy_matches(rec)
    out.append(Goal(13, f"greedy output identical to target-only ({same}/{compared} generations)",
                    Estimate(same / compared if compared else math.nan, math.nan, math.nan), 1.0,
                    compared > 0 and same == compared))

    for workload in dict.fromkeys(c.workload for c in results.cells):
        base = cell_of(results, workload, TARGET_ONLY.label, 1)
        if base is None:
            continue
        per_token_1 = p50_ms_per_token(results, workload, TARGET_ONLY.label, 1)
        for c, threshold in ((8, 3.0), (16, 4.0)):
            cell = cell_of(results, workload, TARGET_ONLY.label, c)
            if cell:
                add(14, f"load {workload}, target-only: tokens/s at c={c} vs c=1",
                    Estimate(cell.tokens_per_s / base.tokens_per_s, math.nan, math.nan), threshold)
        if cell_of(results, workload, TARGET_ONLY.label, 8):
            ratio = p50_ms_per_token(results, workload, TARGET_ONLY.label, 8) / per_token_1
            out.append(Goal(14, f"load {workload}, target-only: p50 ms/token at c=8 vs c=1 (at most 2)",
                            Estimate(ratio, math.nan, math.nan), 2.0, ratio <= 2.0))
        for arm in arms_of(select(rec, phase="load", workload=workload, concurrency=8)):
            if arm == TARGET_ONLY.label:
                continue
            threshold = 0.95 if arm.endswith("auto") else 1.0
            if arm.endswith("auto") or workload == "code-edit":
                add(14, f"load c=8, {workload}: {arm} vs target-only", load_ratio(results, workload, arm,
                                                                                TARGET_ONLY.label, 8), threshold)
    if results.cancel is not None:
        after, before = results.cancel.after, results.cancel.before
        clean = after.idle and after.triton_kv_bytes <= before.triton_kv_bytes and after.draft_kv_bytes <= before.draft_kv_bytes
        out.append(Goal(14, "after the cancellation run: zero live sequences, KV memory back to idle",
                        Estimate(after.triton_live + after.draft_live, math.nan, math.nan), 0, clean))
    return out
