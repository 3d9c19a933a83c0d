"""Render a benchmark Summary: a Markdown report, a CSV of every row, and the Figure-1-style PNG.

Why this module exists: the benchmark's output is read by people (the Markdown table and the README's
figure) and by tools (the CSV), and all three must show the same numbers; they are rendered here from one
`Summary`, never recomputed. The figure follows Chen et al. 2023, Figure 1: left, mean ms/token with its
spread against K; middle, tokens per round / (K+1) against K; right, speedup against K, with Leviathan's
ideal curve for the measured α, c and v(K).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from bench.summary import HF, SPECDEC, Row, Summary

_MODE_COLORS = {"greedy": "tab:blue", "sample": "tab:orange"}
_SYSTEM_LABEL = {SPECDEC: "specdec (gRPC stack)", HF: "HF generate (in-process)"}

OVERHEAD_GOAL_PCT = 5.0
EFFICIENCY_GOAL = 0.95


def fmt(value: float, digits: int = 2) -> str:
    """A number for a table cell: fixed digits, '–' for missing (NaN)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(summary: Summary) -> str:
    headers = ["system", "mode", "K", "ms/token (IQR)", "tok/s", "speedup", "ideal", "efficiency",
               "tok/round", "tok/round/(K+1)", "E[tok/round]", "α implied", "accept rate", "ours/HF"]
    body = [
        [r.system, r.mode, str(r.k), f"{fmt(r.ms_per_token, 1)} ({fmt(r.ms_per_token_q1, 1)}–{fmt(r.ms_per_token_q3, 1)})",
         fmt(r.tokens_per_s, 1), fmt(r.speedup), fmt(r.ideal_speedup), fmt(r.efficiency), fmt(r.tokens_per_round),
         fmt(r.tokens_per_round_norm), fmt(r.expected_tokens_per_round), fmt(r.alpha_implied),
         fmt(r.acceptance_rate), fmt(r.vs_hf)]
        for r in summary.rows
    ]
    return markdown_table(headers, body)


def overhead_table(summary: Summary) -> str:
    headers = ["mode", "K", "client", "draft wait", "draft compute", "Triton wait", "inside Triton",
               "Triton model", "orchestrator", "client hop", "overhead", "% of target step", "% of served step",
               "Triton model / in-process", "draft compute / in-process", "MB/round", "fallback rounds"]
    body = [
        [r.mode, str(r.k), fmt(r.client_ms, 1), fmt(r.draft_ms, 1), fmt(r.draft_compute_ms, 1), fmt(r.target_ms, 1),
         fmt(r.triton_ms, 1), fmt(r.triton_compute_ms, 1), fmt(r.orchestrator_ms, 1), fmt(r.client_wire_ms, 1),
         fmt(r.overhead_ms, 1), fmt(r.overhead_pct, 1), fmt(r.overhead_pct_served, 1), fmt(r.triton_vs_inprocess),
         fmt(r.draft_vs_inprocess),
         fmt(r.mb_per_round, 2), str(r.fallback_rounds)]
        for r in summary.rows if r.system == SPECDEC
    ]
    return markdown_table(headers, body)


def theory_table(summary: Summary) -> str:
    costs = summary.costs
    modes = list(summary.ideal)
    headers = ["K", "v(K) = verify K+1 / 1 token", *(f"ideal speedup ({m})" for m in modes)]
    ks = sorted({k for per_mode in summary.ideal.values() for k in per_mode})
    body = [[str(k), fmt(costs.verify_cost_ratio(k)), *(fmt(summary.ideal[m].get(k, math.nan)) for m in modes)]
            for k in ks]
    return markdown_table(headers, body)


def goals(summary: Summary) -> list[str]:
    """One line per goal of the issue: the number and whether it is met (not asserts: a report)."""
    lines = []
    for mode in summary.ideal:
        best = summary.best(SPECDEC, mode)
        if best is None:
            continue
        eff_ok = best.efficiency >= EFFICIENCY_GOAL
        over_ok = best.overhead_pct <= OVERHEAD_GOAL_PCT
        served_ok = best.overhead_pct_served <= OVERHEAD_GOAL_PCT
        lines.append(
            f"- **{mode}**, best K = {best.k}: speedup {fmt(best.speedup)} vs ideal {fmt(best.ideal_speedup)} → "
            f"efficiency **{fmt(best.efficiency)}** (goal ≥ {EFFICIENCY_GOAL}: {'met' if eff_ok else 'not met'}); "
            f"orchestrator + wire overhead {fmt(best.overhead_ms, 1)} ms/round = **{fmt(best.overhead_pct, 1)}%** of the "
            f"in-process target step (goal ≤ {OVERHEAD_GOAL_PCT:g}%: {'met' if over_ok else 'not met'}), "
            f"**{fmt(best.overhead_pct_served, 1)}%** of the served target-only step timed in the same phase "
            f"({'met' if served_ok else 'not met'})."
        )
        ratios = [(r.k, r.vs_hf) for r in summary.rows if r.system == SPECDEC and r.mode == mode and r.k > 0
                  and math.isfinite(r.vs_hf)]
        if ratios:
            wins = sum(v >= 1.0 for _, v in ratios)
            best_hf = summary.best(HF, mode)
            hf_best = f"; at each system's best K: {fmt(best.tokens_per_s, 1)} vs {fmt(best_hf.tokens_per_s, 1)} tok/s" \
                if best_hf else ""
            lines.append(
                "  ours/HF assisted tokens/s by K: " + ", ".join(f"K={k}: {fmt(v)}" for k, v in ratios)
                + f" (≥ 1 at {wins}/{len(ratios)} K{hf_best})."
            )
        base, hf_base = summary.row(SPECDEC, mode, 0), summary.row(HF, mode, 0)
        if base and hf_base:
            lines.append(f"  target-only (K=0): ours {fmt(base.ms_per_token, 1)} ms/token vs HF generate "
                         f"{fmt(hf_base.ms_per_token, 1)} ms/token (ratio {fmt(base.vs_hf)}).")
    return lines


def render_markdown(summary: Summary, figure_name: str | None) -> str:
    costs = summary.costs
    settings = "\n".join(f"- {k}: {v}" for k, v in summary.settings.items())
    alphas = ", ".join(f"{m}: α = {fmt(a.mean, 3)} ({a.positions} positions)" for m, a in summary.alphas.items())
    parts = [
        "# specdec benchmark: ArS vs SpS (our gRPC stack) vs Hugging Face assisted generation",
        settings,
        "## Theory (measured in-process, same engine as the servers)",
        (f"- {alphas} — Σ min(p, q) averaged over the target's own generated positions.\n"
         f"- target step {fmt(costs.target_step_ms, 1)} ms, draft step {fmt(costs.draft_step_ms, 1)} ms → "
         f"c = {fmt(costs.draft_cost_ratio, 3)} (context {costs.context_length} tokens).\n"
         "- ideal speedup = E[tokens/round] / (K·c + v(K)) (Leviathan et al. 2023, §3)."),
        theory_table(summary),
        "## Results",
        ("ms/token = client wall time / generated tokens, median over generations (IQR in parentheses); "
         "speedup vs the same system's K = 0 in the same mode; efficiency = speedup / ideal; "
         "ours/HF = our tokens/s over HF's at the same mode and K."),
        results_table(summary),
        "## Where a round's time goes (specdec, ms per round)",
        ("draft/Triton *wait* = orchestrator waiting on the RPC; *draft compute* = the draft service's round "
         "time under its model lock; *inside Triton* = Triton's request time, *Triton model* = its compute (input+infer+output); "
         "*client hop* = client wall − orchestrator total; *overhead* = client − draft compute − Triton model "
         "(orchestrator + every wire + framework), also as % of one in-process target step and as % of the served "
         "target step (Triton model time per K = 0 round, measured in the same phase as the overhead, so the "
         "machine's drift between phases cancels); *… / in-process* = "
         "the servers' model time over the same forwards timed in-process (1 = no serving penalty); MB/round = "
         "probability-row bytes the draft (q) and Triton (p) sent per round, measured by their counters (only each "
         "row's support travels under greedy, top-k and top-p)."),
        overhead_table(summary),
        "## Goals",
        "\n".join(goals(summary)),
    ]
    if figure_name:
        parts.append(f"![ms/token, tokens per round and speedup vs K]({figure_name})")
    return "\n\n".join(p for p in parts if p) + "\n"


def write_csv(rows: Sequence[Row], path: Path) -> None:
    fields = [f.name for f in dataclasses.fields(Row)]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow(dataclasses.asdict(row))


def _series(summary: Summary, system: str, mode: str) -> list[Row]:
    return sorted((r for r in summary.rows if r.system == system and r.mode == mode), key=lambda r: r.k)


def plot(summary: Summary, path: Path, title: str = "") -> None:
    """The 3-panel figure (Chen et al. 2023, Figure 1 style) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.4))
    modes = list(dict.fromkeys(r.mode for r in summary.rows))
    for mode in modes:
        color = _MODE_COLORS.get(mode)
        for system, style, marker in ((SPECDEC, "-", "o"), (HF, "--", "s")):
            rows = _series(summary, system, mode)
            if not rows:
                continue
            ks = [r.k for r in rows]
            label = f"{_SYSTEM_LABEL[system]}, {mode}"
            left.plot(ks, [r.ms_per_token for r in rows], style, marker=marker, color=color, label=label)
            left.fill_between(ks, [r.ms_per_token_q1 for r in rows], [r.ms_per_token_q3 for r in rows],
                              color=color, alpha=0.15 if system == SPECDEC else 0.07)
            right.plot(ks, [r.speedup for r in rows], style, marker=marker, color=color, label=label)
            if system == SPECDEC:
                middle.plot(ks, [r.tokens_per_round_norm for r in rows], style, marker=marker, color=color,
                            label=f"specdec (stack), {mode}")
                middle.plot(ks, [r.expected_tokens_per_round / (r.k + 1) for r in rows], ":", color=color,
                            label=f"theory (α={summary.alphas[mode].mean:.2f}), {mode}")
            else:
                middle.plot(ks, [r.tokens_per_round_norm for r in rows], style, marker=marker, color=color,
                            alpha=0.5, label=f"HF assisted, {mode}")
        ideal = summary.ideal.get(mode, {})
        if ideal:
            ks = [0, *sorted(ideal)]
            right.plot(ks, [1.0, *(ideal[k] for k in ks[1:])], ":", linewidth=2, color=color,
                       label=f"ideal (Leviathan), {mode}")
    right.axhline(1.0, color="grey", linewidth=0.8)
    left.set(xlabel="K (draft tokens per round)", ylabel="ms / token", title="Mean sampling time (IQR shaded)")
    middle.set(xlabel="K", ylabel="tokens per round / (K+1)", title="Acceptance", ylim=(0, 1.05))
    right.set(xlabel="K", ylabel="speedup over K = 0", title="Speedup (vs the same system's K = 0)")
    for ax in (left, middle, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(summary: Summary, out_dir: Path, stem: str = "bench", title: str = "") -> dict[str, Path]:
    """Write <stem>.md, <stem>.csv and <stem>.png into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / f"{stem}.md", "csv": out_dir / f"{stem}.csv", "figure": out_dir / f"{stem}.png"}
    plot(summary, paths["figure"], title)
    write_csv(summary.rows, paths["csv"])
    paths["markdown"].write_text(render_markdown(summary, paths["figure"].name))
    return paths
