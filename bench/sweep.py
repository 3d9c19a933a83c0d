"""Self-draft sweep: which cut-down copy of the target makes the best draft on this machine?

Why this module exists: there is no second model with SmolLM2's tokenizer, so the draft is the target's
own weights with fewer layers. Which layers to keep is a trade: fewer layers make the draft cheaper
(smaller c) but less like the target (smaller α). This sweep measures both, in-process, for early-exit
drafts (the first N layers) and layer-skip drafts (dropping a middle block), under greedy and sampling,
computes Leviathan's ideal speedup for every K with the measured verify cost v(K), and ranks the drafts;
the winner is the benchmark's default ``--draft-layers``.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.report import fmt, markdown_table
from bench.theory import Costs, best_k, generate, ideal_speedups, measure_alpha, step_times
from specdec import models
from specdec.sampling import SamplingParams

log = logging.getLogger(__name__)


def default_selections(num_layers: int) -> list[tuple[str, str]]:
    """(name, layer spec) pairs: early exits after 4..24 layers, and layer skips of middle blocks."""
    last = num_layers - 1
    early = [(f"first {n}", f"0-{n - 1}") for n in (4, 6, 8, 12, 16, 24) if n < num_layers]
    skips = [(lo, hi) for lo, hi in ((15, 16), (14, 16), (13, 17), (12, 17), (10, 19), (8, 21), (20, 27)) if hi < last]
    skip = [(f"skip {lo}-{hi}", f"0-{lo - 1},{hi + 1}-{last}") for lo, hi in skips]
    middle = list(range(1, last))
    odd = [i for i in middle if i >= num_layers // 3 and i % 2 == 1]
    alternate = [("skip odd middle", ",".join(str(i) for i in range(num_layers) if i not in odd))] if odd else []
    return early + skip + alternate


@dataclass(frozen=True)
class SweepRow:
    name: str
    layers: str
    dtype: str
    kept: int
    alpha_greedy: float
    alpha_sample: float
    draft_step_ms: float
    c: float
    best_k_greedy: int
    ideal_greedy: float
    best_k_sample: int
    ideal_sample: float

    @property
    def score(self) -> float:
        """What the ranking uses: the mean of the best ideal speedups of both modes."""
        return (self.ideal_greedy + self.ideal_sample) / 2


def run_sweep(
    target_spec: str,
    prompts: Sequence[Sequence[int]],
    sample_params: SamplingParams,
    ks: Sequence[int],
    max_new_tokens: int,
    seed: int,
    eos_token_id: int | None,
    cost_trials: int,
    selections: Sequence[tuple[str, str]] | None = None,
    dtypes: Sequence[str] = ("float32",),
    cache_dir: Path | None = None,
    progress: Callable[[int], None] = lambda n: None,
) -> tuple[list[SweepRow], Costs]:
    """Measure α (greedy and sampling), c and the ideal speedup for every draft (layer selection x weight
    dtype; the target stays as loaded, float32); best first."""
    target = models.load_model(target_spec, cache_dir=cache_dir)
    num_layers = int(target.config.num_hidden_layers)
    selections = list(selections or default_selections(num_layers))
    greedy = SamplingParams(temperature=0.0)
    sequences = {
        mode: [(generate(target, p, max_new_tokens, params, seed + i, eos_token_id), len(p)) for i, p in enumerate(prompts)]
        for mode, params in (("greedy", greedy), ("sample", sample_params))
    }
    progress(1)
    context = list(sequences["greedy"][0][0][: len(prompts[0]) + max_new_tokens // 2])
    (target_ms,) = step_times([(target, [1, *(k + 1 for k in ks)])], context, cost_trials)
    progress(1)
    rows = []
    for (name, layers), dtype in ((sel, dtype) for sel in selections for dtype in dtypes):
        keep = models.parse_layers(layers)
        draft = models.load_model(target_spec, keep_layers=keep, dtype=dtype, cache_dir=cache_dir)
        alpha_g = measure_alpha(target, draft, sequences["greedy"], greedy).mean
        alpha_s = measure_alpha(target, draft, sequences["sample"], sample_params).mean
        # c against a target step timed alongside (interleaved), so background load cancels in the ratio;
        # v(K) comes from the target's own measurement above.
        step_target, step_draft = step_times([(target, [1]), (draft, [1])], context, cost_trials)
        scale = target_ms[1] / step_target[1]
        draft_ms = step_draft[1] * scale
        costs = Costs(len(context), target_ms[1], draft_ms, {k: target_ms[k + 1] for k in ks})
        ideal_g, ideal_s = ideal_speedups(alpha_g, costs, ks), ideal_speedups(alpha_s, costs, ks)
        kg, ks_ = best_k(ideal_g), best_k(ideal_s)
        rows.append(SweepRow(name, layers, dtype, len(keep or ()), alpha_g, alpha_s, draft_ms, costs.draft_cost_ratio,
                             kg, ideal_g[kg], ks_, ideal_s[ks_]))
        log.info("%s (%s, %s): α greedy %.3f, sample %.3f, c %.3f, ideal %.2f/%.2f", name, layers, dtype, alpha_g, alpha_s,
                 costs.draft_cost_ratio, ideal_g[kg], ideal_s[ks_])
        del draft
        progress(1)
    target_costs = Costs(len(context), target_ms[1], math.nan, {k: target_ms[k + 1] for k in ks})
    return sorted(rows, key=lambda r: r.score, reverse=True), target_costs


def sweep_steps(num_selections: int) -> int:
    """Progress-bar steps of run_sweep: continuations, target costs, one per draft."""
    return 2 + num_selections


def render_sweep(rows: Sequence[SweepRow], target_costs: Costs, settings: dict[str, str]) -> str:
    headers = ["draft", "layers kept", "dtype", "#", "α greedy", "α sample", "draft ms/step", "c",
               "best K (greedy)", "ideal (greedy)", "best K (sample)", "ideal (sample)"]
    body = [[r.name, r.layers, r.dtype, str(r.kept), fmt(r.alpha_greedy, 3), fmt(r.alpha_sample, 3), fmt(r.draft_step_ms, 1),
             fmt(r.c, 3), str(r.best_k_greedy), fmt(r.ideal_greedy), str(r.best_k_sample), fmt(r.ideal_sample)]
            for r in rows]
    v = ", ".join(f"v({k})={fmt(target_costs.verify_cost_ratio(k))}" for k in sorted(target_costs.verify_ms))
    lines = [
        "# SmolLM2 self-draft sweep",
        "\n".join(f"- {k}: {val}" for k, val in settings.items()),
        (f"Target: {fmt(target_costs.target_step_ms, 1)} ms per 1-token step at context {target_costs.context_length}; "
         f"verify cost ratios {v}. Ideal speedup = E[tokens/round] / (K·c + v(K)), best K in 1..{max(target_costs.verify_ms)}; "
         "rows ranked by the mean of the two modes' best ideal speedups."),
        markdown_table(headers, body),
        f"Best: **{rows[0].name}, {rows[0].dtype}** (`--draft-layers {rows[0].layers} --draft-dtype {rows[0].dtype}`)."
        if rows else "",
    ]
    return "\n\n".join(lines) + "\n"


def write_sweep(rows: Sequence[SweepRow], target_costs: Costs, settings: dict[str, str], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "sweep.md", "csv": out_dir / "sweep.csv"}
    paths["markdown"].write_text(render_sweep(rows, target_costs, settings))
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*SweepRow.__dataclass_fields__, "score"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**asdict(row), "score": row.score})
    return paths

