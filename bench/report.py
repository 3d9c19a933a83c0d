"""Write a run's results: Markdown (goals, then every table), CSV (every generation, every load cell), figures.

Why this module exists: the numbers are computed once in `bench.summary`; this module only renders them,
so the files cannot disagree with each other.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from bench.arms import TARGET_ONLY
from bench.goals import goals
from bench.stats import Estimate
from bench.summary import Results, Table, all_tables, p50_ms_per_token, paired, select


def fmt(value: object, digits: int = 2) -> str:
    if isinstance(value, Estimate):
        return format(value, f".{digits}f")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_table(table: Table) -> str:
    parts = [f"### {table.title}", ""]
    if table.note:
        parts += [table.note, ""]
    if table.headers:
        parts.append(markdown_table(table.headers, table.rows))
    return "\n".join(parts)


def render_markdown(results: Results, figures: Sequence[str], title: str) -> str:
    checked = goals(results)
    lines = [f"# specdec benchmark: {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in results.settings.items()]
    lines += ["", "Every ratio is tokens/s over tokens/s measured in this run, with its 95% interval in brackets "
              "(paired bootstrap over the prompts; `bench/stats.py`).", "", "## Goals", ""]
    lines.append(markdown_table(
        ("issue", "figure", "measured [95% interval]", "goal", "met"),
        [(f"#{g.issue}", g.text, g.value, f"≥ {g.threshold:g}" if "at most" not in g.text else f"≤ {g.threshold:g}",
          "yes" if g.met else "**no**") for g in checked],
    ))
    for name in figures:
        lines += ["", f"![{name}]({name})"]
    lines += ["", "## Tables", ""]
    for table in all_tables(results):
        lines += [render_table(table), ""]
    return "\n".join(lines)


def write_records(results: Results, path: Path) -> None:
    names = [f.name for f in dataclasses.fields(results.records[0])] if results.records else []
    names = [n for n in names if n not in ("output_ids", "extra")]
    extras = sorted({k for r in results.records for k in r.extra})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*names, "output_tokens", *extras])
        for r in results.records:
            writer.writerow([*(getattr(r, n) if n != "rounds_by_k" else " ".join(map(str, r.rounds_by_k))
                               for n in names), len(r.output_ids), *(r.extra.get(k, "") for k in extras)])


def write_cells(results: Results, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["workload", "arm", "concurrency", "generations", "tokens", "wall_s", "tokens_per_s",
                         "forwards", "forward_sequences", "sequences_per_forward", "forward_s", "wait_s", "busy",
                         "lookup_drafted", "lookup_accepted", "prompt_tokens", "reused_tokens", "rounds"])
        for c in results.cells:
            writer.writerow([c.workload, c.arm, c.concurrency, c.generations, c.tokens, f"{c.wall_s:.3f}",
                             f"{c.tokens_per_s:.3f}", c.forwards, c.forward_sequences, f"{c.sequences_per_forward:.3f}",
                             f"{c.forward_s:.3f}", f"{c.wait_s:.3f}", f"{c.busy:.3f}", c.lookup_drafted,
                             c.lookup_accepted, c.prompt_tokens, c.reused_tokens, c.rounds])


def plot_single(results: Results, path: Path, title: str) -> bool:
    """Speedup over target-only per arm, one panel per workload, greedy and sampling side by side."""
    single = select(results.records, phase="single")
    workloads = list(dict.fromkeys(r.workload for r in single))
    if not workloads:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r.mode for r in single))
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 4.6), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        arms = [a for a in dict.fromkeys(r.arm for r in single if r.workload == workload) if a != TARGET_ONLY.label]
        width = 0.8 / len(modes)
        for m, mode in enumerate(modes):
            values = [paired(single, arm, TARGET_ONLY.label, workload=workload, mode=mode) for arm in arms]
            xs = [i + (m - (len(modes) - 1) / 2) * width for i in range(len(arms))]
            heights = [v.value for v in values]
            errors = [[max(v.value - v.low, 0) if math.isfinite(v.low) else 0 for v in values],
                      [max(v.high - v.value, 0) if math.isfinite(v.high) else 0 for v in values]]
            ax.bar(xs, heights, width, yerr=errors, capsize=2, label=mode)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels(arms, rotation=60, ha="right", fontsize=7)
        ax.set_title(workload)
        ax.set_ylabel("tokens/s vs target-only (95% CI)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_load(results: Results, path: Path, title: str) -> bool:
    """Aggregate tokens/s and p50 ms/token vs concurrency, per load workload and arm."""
    if not results.cells:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    for workload in dict.fromkeys(c.workload for c in results.cells):
        for arm in dict.fromkeys(c.arm for c in results.cells if c.workload == workload):
            cells = sorted((c for c in results.cells if (c.workload, c.arm) == (workload, arm)),
                           key=lambda c: c.concurrency)
            xs = [c.concurrency for c in cells]
            style = "--" if workload == "open" else "-"
            left.plot(xs, [c.tokens_per_s for c in cells], style, marker="o", label=f"{workload}: {arm}")
            p50 = [p50_ms_per_token(results, workload, arm, c) for c in xs]
            right.plot(xs, p50, style, marker="o", label=f"{workload}: {arm}")
    left.set_xlabel("generations in flight")
    left.set_ylabel("aggregate tokens/s")
    right.set_xlabel("generations in flight")
    right.set_ylabel("p50 ms per token (each generation's wall / tokens)")
    for ax in (left, right):
        ax.set_xticks(sorted({c.concurrency for c in results.cells}))
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(results: Results, out_dir: Path, title: str) -> dict[str, Path]:
    """bench.md, records.csv, load.csv, bench.png and load.png (the figures when their phases ran)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "bench.md", "records": out_dir / "records.csv"}
    figures = []
    if plot_single(results, out_dir / "bench.png", title):
        paths["figure"] = out_dir / "bench.png"
        figures.append("bench.png")
    if plot_load(results, out_dir / "load.png", title):
        paths["load figure"] = out_dir / "load.png"
        figures.append("load.png")
    if results.cells:
        paths["load"] = out_dir / "load.csv"
        write_cells(results, paths["load"])
    write_records(results, paths["records"])
    paths["markdown"].write_text(render_markdown(results, figures, title) + "\n")
    return paths

