"""Turn the records of a run into the report's tables.

Why this module exists: the phases only record generations; every derived number the report shows
(aggregate tokens/s, speedups with their intervals, tokens per round, the served costs behind the model
draft's ideal, throughput vs concurrency, what the servers held after the cancellations) is computed here,
once, from those records, so the Markdown, the CSV and the figures cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bench.arms import HF_PLAIN, PROMPT_LOOKUP, TARGET_ONLY, Record
from bench.load import CancelRun, Cell
from bench.single import LOOKUP_DRAFTERS
from bench.stats import NONE, Estimate, clustered_ratio, paired_ratio, percentile, rate
from specdec.speedup import expected_tokens_per_round

TableCell = object  # str, int, float or Estimate


@dataclass(frozen=True)
class Table:
    title: str
    headers: tuple[str, ...]
    rows: list[tuple[TableCell, ...]]
    note: str = ""


@dataclass
class Results:
    """Everything a run measured."""

    records: list[Record] = field(default_factory=list)
    best: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (workload, mode, drafter) -> fixed K
    alphas: dict[str, float] = field(default_factory=dict)  # mode -> α of the model draft (in-process)
    cells: list[Cell] = field(default_factory=list)
    cancel: CancelRun | None = None
    suffix_cache: dict[str, tuple[int, int]] = field(default_factory=dict)  # after "pass 1"/"pass 2": (entries, bytes)
    suffix_cache_bound: int = 0  # entries
    settings: dict[str, str] = field(default_factory=dict)


def select(records: Iterable[Record], **match: object) -> list[Record]:
    return [r for r in records if all(getattr(r, k) == v for k, v in match.items())]


def matched(records: Sequence[Record], arm_a: str, arm_b: str, **match: object) -> tuple[
        list[tuple[str, int, int]], list[tuple[int, float]], list[tuple[int, float]]]:
    """The items both arms ran (workload, concurrency, item: figures pooled over workloads pair correctly
    too), and each arm's (tokens, wall ms) on them, in the same order."""
    def key(r: Record) -> tuple[str, int, int]:
        return (r.workload, r.concurrency, r.item)

    a = {key(r): (r.tokens, r.wall_ms) for r in select(records, arm=arm_a, **match)}
    b = {key(r): (r.tokens, r.wall_ms) for r in select(records, arm=arm_b, **match)}
    items = sorted(set(a) & set(b))
    return items, [a[i] for i in items], [b[i] for i in items]


def paired(records: Sequence[Record], arm_a: str, arm_b: str, **match: object) -> Estimate:
    """tokens/s of arm a over arm b on the items both ran (`matched`)."""
    items, a, b = matched(records, arm_a, arm_b, **match)
    return paired_ratio(a, b) if items else NONE


def tokens_per_s(records: Sequence[Record]) -> float:
    return rate([r.tokens for r in records], [r.wall_ms / 1e3 for r in records])


def arms_of(records: Iterable[Record]) -> list[str]:
    return list(dict.fromkeys(r.arm for r in records))


def _acceptance(records: Sequence[Record]) -> float:
    drafted = sum(r.drafted for r in records)
    return sum(r.accepted for r in records) / drafted if drafted else math.nan


def _per_round(records: Sequence[Record]) -> float:
    rounds = sum(r.rounds for r in records)
    return sum(r.tokens for r in records) / rounds if rounds else math.nan


def _off_share(records: Sequence[Record]) -> float:
    rounds = sum(r.rounds for r in records)
    return sum(r.off_rounds for r in records) / rounds if rounds else math.nan


def _mean_k(records: Sequence[Record]) -> float:
    counts = [0] * max((len(r.rounds_by_k) for r in records), default=0)
    for r in records:
        for k, n in enumerate(r.rounds_by_k):
            counts[k] += n
    total = sum(counts)
    return sum(k * n for k, n in enumerate(counts)) / total if total else math.nan


def greedy_matches(records: Sequence[Record]) -> tuple[int, int]:
    """(generations whose greedy output equals target-only's on the same item, generations compared) over every
    specdec arm, single stream and under load."""
    def key(r: Record) -> tuple[str, str, int, int]:  # the load phase: the same item at the same concurrency
        return (r.phase, r.workload, r.concurrency, r.item)

    reference = {key(r): r.output_ids for r in records if r.arm == TARGET_ONLY.label and r.mode == "greedy"}
    compared = [(r, reference[key(r)]) for r in records
                if r.mode == "greedy" and r.arm != TARGET_ONLY.label and not r.arm.startswith("HF")
                and key(r) in reference]
    return sum(r.output_ids == ref for r, ref in compared), len(compared)


def calibration_table(results: Results) -> Table:
    records = select(results.records, phase="calibration")
    rows = []
    for workload in dict.fromkeys(r.workload for r in records):
        for mode in dict.fromkeys(r.mode for r in records):
            for name in (*LOOKUP_DRAFTERS, PROMPT_LOOKUP):
                chosen = results.best.get((workload, mode, name))
                if chosen is None:
                    continue
                prefix = "HF prompt lookup" if name == PROMPT_LOOKUP else f"{name} K="
                scores = []
                for arm in arms_of(records):
                    if arm.startswith(prefix):
                        k = int(arm.rsplit(" ", 1)[-1].removeprefix("K="))
                        scores.append(f"K={k}: {tokens_per_s(select(records, workload=workload, mode=mode, arm=arm)):.1f}")
                rows.append((workload, mode, name, " · ".join(scores), chosen))
    return Table("Calibration: the fixed K each lookup drafter and HF prompt lookup get",
                 ("workload", "mode", "drafter", "tokens/s by K (calibration prompts)", "chosen K"), rows,
                 "Chosen on prompts that are never measured afterwards, so the fixed-K rows are not flattered.")


def single_table(results: Results, workload: str, mode: str) -> Table:
    records = select(results.records, phase="single", workload=workload, mode=mode)
    base = TARGET_ONLY.label
    hf_best = best_hf_arm(records)
    rows = []
    for arm in arms_of(records):
        mine = select(records, arm=arm)
        is_hf = arm.startswith("HF")
        rows.append((
            arm, len(mine), tokens_per_s(mine), paired(records, arm, base),
            NONE if is_hf else paired(records, arm, HF_PLAIN.label),
            NONE if is_hf or hf_best is None else paired(records, arm, hf_best),
            _per_round(mine), "–" if is_hf else _acceptance(mine),
            _off_share(mine) if arm.endswith("auto") else "–", _mean_k(mine) if arm.endswith("auto") else "–",
        ))
    return Table(f"{workload}, {mode}", ("arm", "generations", "tokens/s", "vs target-only", "vs HF generate",
                                         f"vs {hf_best or 'HF prompt lookup'}", "tokens/round", "acceptance",
                                         "rounds off", "mean K"), rows)


def best_hf_arm(records: Sequence[Record]) -> str | None:
    lookups = [a for a in arms_of(records) if a.startswith("HF prompt lookup")]
    return max(lookups, key=lambda a: tokens_per_s(select(records, arm=a))) if lookups else None


def best_specdec_arm(records: Sequence[Record]) -> str | None:
    ours = [a for a in arms_of(records) if not a.startswith("HF") and a != TARGET_ONLY.label]
    return max(ours, key=lambda a: tokens_per_s(select(records, arm=a))) if ours else None


def serving_table(results: Results) -> Table:
    """Target-only through the stack vs HF plain generate, and where the stack's time per token goes."""
    rows = []
    single = select(results.records, phase="single")
    for mode in dict.fromkeys(r.mode for r in single):
        for workload in [*dict.fromkeys(r.workload for r in single), "all"]:
            match = {"mode": mode} if workload == "all" else {"mode": mode, "workload": workload}
            ours = select(single, arm=TARGET_ONLY.label, **match)
            hf = select(single, arm=HF_PLAIN.label, **match)
            if not ours or not hf:
                continue
            tokens = sum(r.tokens for r in ours)
            per = {name: sum(getattr(r, name) if name.endswith("_ms") and hasattr(r, name) else r.extra.get(name, 0.0)
                             for r in ours) / tokens
                   for name in ("wall_ms", "total_ms", "target_ms", "triton_model_ms")}
            hf_ms = sum(r.wall_ms for r in hf) / sum(r.tokens for r in hf)
            ratio = paired(single, TARGET_ONLY.label, HF_PLAIN.label, **match)
            rows.append((workload, mode, per["wall_ms"], per["total_ms"], per["target_ms"], per["triton_model_ms"],
                         hf_ms, ratio))
    return Table("Serving cost: target-only through the stack vs Hugging Face plain generate",
                 ("workload", "mode", "client ms/token", "orchestrator", "waiting on Triton", "Triton model",
                  "HF ms/token", "ours/HF tokens/s"), rows,
                 "Per generated token (prefill included). *orchestrator*: its wall time for the generation; "
                 "*waiting on Triton*: its wait on the Triton stream; *Triton model*: the model answering batches "
                 "(forward, warping, packing; `specdec_target_forward_seconds_total`). Between them: the Triton hop "
                 "and server, the orchestrator's own work, the public hop.")


@dataclass(frozen=True)
class ModelRow:
    mode: str
    arm: str
    k: int | None
    speedup: Estimate
    acceptance: float
    tokens_per_round: float
    c: float  # draft wait per drafted token / target wait per target-only token
    v: float  # target wait per round at K / per target-only token
    ideal: float
    efficiency: float


def model_rows(results: Results) -> list[ModelRow]:
    records = select(results.records, phase="model")
    rows = []
    for mode in dict.fromkeys(r.mode for r in records):
        here = select(records, mode=mode)
        base = select(here, arm=TARGET_ONLY.label)
        # What target-only costs per token as served (its rounds decode several tokens on the target each).
        t0 = sum(r.target_ms for r in base) / max(sum(r.tokens for r in base), 1)
        alpha = results.alphas.get(mode, math.nan)
        for arm in arms_of(here):
            if arm == TARGET_ONLY.label:
                continue
            mine = select(here, arm=arm)
            k = None if arm.split()[1] == "auto" else int(arm.split()[1].removeprefix("K="))
            rounds = max(sum(r.rounds for r in mine), 1)
            c = v = ideal = math.nan
            if k and t0 > 0:
                c = sum(r.draft_ms for r in mine) / rounds / (k * t0)
                v = sum(r.target_ms for r in mine) / rounds / t0
                if math.isfinite(alpha):
                    ideal = expected_tokens_per_round(alpha, k) / (k * c + v)
            speedup = paired(here, arm, TARGET_ONLY.label)
            rows.append(ModelRow(mode, arm, k, speedup, _acceptance(mine), _per_round(mine), c, v, ideal,
                                 speedup.value / ideal if ideal == ideal else math.nan))
    return rows


def model_table(results: Results) -> Table:
    rows = [(r.mode, r.arm, r.speedup, r.acceptance, r.tokens_per_round,
             expected_tokens_per_round(results.alphas[r.mode], r.k) if r.k and r.mode in results.alphas else "–",
             r.c, r.v, r.ideal, r.efficiency) for r in model_rows(results)]
    alphas = ", ".join(f"{m}: α = {a:.3f}" for m, a in results.alphas.items())
    return Table("The model draft (SmolLM2 self-draft): measured vs Leviathan's ideal from served costs",
                 ("mode", "arm", "vs target-only", "acceptance", "tokens/round", "E[tokens/round] from α", "c served",
                  "v(K) served", "ideal", "efficiency"), rows,
                 f"{alphas} (in-process, on the target-only outputs). *c served* = the orchestrator's wait on the "
                 "draft per drafted token / its wait on Triton per target-only token; *v(K) served* = its wait on "
                 "Triton per round at K / per target-only token; ideal = E[tokens/round] / (K·c + v(K)); "
                 "efficiency = measured / ideal (below 1 by what the orchestrator and the client hop cost). "
                 "*coupled*: the reproducible mode (draft and target share each position's noise).")


def two_pass_table(results: Results) -> Table:
    rows = []
    history = select(results.records, phase="history")
    first = select(results.records, phase="pass 1")
    second = select(results.records, phase="pass 2")
    suffix = next((a for a in arms_of(first) if a.startswith("suffix")), "suffix")
    hf = best_hf_arm(first)
    if history:
        entries, nbytes = results.suffix_cache.get("history", (0, 0))
        rows.append((f"history: {len(history)} other problems", tokens_per_s(history), "", "",
                     _acceptance(history), entries, nbytes / 1e6))
    for name, records in (("pass 1", first), ("pass 2", second)):
        if not records:
            continue
        entries, nbytes = results.suffix_cache.get(name, (0, 0))
        rows.append((name, tokens_per_s(select(records, arm=suffix)), paired(records, suffix, TARGET_ONLY.label),
                     paired(records, suffix, hf) if hf and select(records, arm=hf) else "–",
                     _acceptance(select(records, arm=suffix)), entries, nbytes / 1e6))
    if first and second:
        a = {r.item: (r.tokens, r.wall_ms) for r in select(second, arm=suffix)}
        b = {r.item: (r.tokens, r.wall_ms) for r in select(first, arm=suffix)}
        items = sorted(set(a) & set(b))
        rows.append(("pass 2 / pass 1", "", paired_ratio([a[i] for i in items], [b[i] for i in items]), "", "", "",
                     ""))
    served = (f"first serves {len(history)} other HumanEval problems (never measured), as a running service has "
              "answered others before; then " if history else "")
    return Table(f"The suffix drafter's cross-request cache: the same HumanEval prompts twice ({suffix}, greedy)",
                 ("pass", "tokens/s", "vs target-only", f"vs {hf or 'HF prompt lookup'}", "acceptance",
                  "cache entries", "cache MB"), rows,
                 f"A fresh draft service (its cache bound: {results.suffix_cache_bound:,} entries) {served}each "
                 "measured problem is met for the first time in pass 1, beside target-only and HF prompt lookup at "
                 "its calibrated K; pass 2 finds pass 1's outputs in the cache. Cache readings after each stage.")


def load_table(results: Results) -> Table:
    rows = []
    for cell in results.cells:
        records = select(results.records, phase="load", workload=cell.workload, arm=cell.arm,
                         concurrency=cell.concurrency)
        one = cell_of(results, cell.workload, cell.arm, 1)
        per_token = [r.wall_ms / r.tokens for r in records if r.tokens]
        versus = load_ratio(results, cell.workload, cell.arm, TARGET_ONLY.label, cell.concurrency)
        rows.append((cell.workload, cell.arm, cell.concurrency, cell.generations, cell.tokens_per_s,
                     cell.tokens_per_s / one.tokens_per_s if one else "–", percentile(per_token, 50),
                     percentile(per_token, 99), cell.sequences_per_forward, versus))
    return Table("Load: aggregate tokens/s with c generations in flight (greedy)",
                 ("workload", "arm", "c", "generations", "tokens/s", "vs c=1", "p50 ms/token", "p99 ms/token",
                  "sequences/forward", "vs target-only"), rows,
                 "Each cell ran in rounds, the arms taking turns (reversed every other round), so the machine's drift "
                 "falls on every arm alike; tokens/s = the cell's tokens / its wall time over its rounds; "
                 "ms/token = each generation's wall time / its tokens; "
                 "sequences/forward from the Triton model's counters; *vs target-only*: tokens/s over target-only's at "
                 "the same c, its interval from the spread of that ratio round by round (a t-interval; a round's "
                 "generations share the machine's state, so resampling them one by one would understate it).")


def load_ratio(results: Results, workload: str, arm_a: str, arm_b: str, concurrency: int) -> Estimate:
    """Throughput ratio of two arms at one concurrency: per-generation (tokens, wall) pairs by position,
    so the ratio is of Σtokens/Σwall — by Little's law the same ratio as the cells' throughputs when
    both keep c generations in flight. Its interval comes from the rounds (`stats.clustered_ratio`): the
    generations of a round share the machine's state, the rounds do not."""
    if arm_a == arm_b:
        return Estimate(1.0, 1.0, 1.0)
    items, a, b = matched(results.records, arm_a, arm_b, phase="load", workload=workload, concurrency=concurrency)
    if not items:
        return NONE
    cell = cell_of(results, workload, arm_a, concurrency)
    return clustered_ratio(a, b, [cell.round_of(item) if cell is not None else 0 for _, _, item in items])


def cancel_table(results: Results) -> Table:
    run = results.cancel
    if run is None:
        return Table("Cancellations", (), [])
    rows = [(name, o.triton_live, o.triton_kv_bytes / 1e6, o.draft_live, o.draft_kv_bytes / 1e6)
            for name, o in (("idle, before the load phase", run.before), ("during the cancellation run", run.peak),
                            (f"after it ({run.drain_s:.1f} s to idle)", run.after))]
    return Table(f"No leak: {run.calls} calls, {run.concurrency} in flight, each cancelled by its caller after 0.2-3 s; suffix auto and the model draft in turn "
                 f"({run.cancelled} cancelled, {run.completed} finished first, {run.failed} failed otherwise)",
                 ("when", "Triton live sequences", "Triton KV MB", "draft live sequences", "draft KV MB"), rows)


def cell_of(results: Results, workload: str, arm: str, concurrency: int) -> Cell | None:
    return next((c for c in results.cells if (c.workload, c.arm, c.concurrency) == (workload, arm, concurrency)), None)


def p50_ms_per_token(results: Results, workload: str, arm: str, concurrency: int) -> float:
    records = select(results.records, phase="load", workload=workload, arm=arm, concurrency=concurrency)
    return percentile([r.wall_ms / r.tokens for r in records if r.tokens], 50)


def all_tables(results: Results) -> list[Table]:
    single = select(results.records, phase="single")
    tables = [calibration_table(results)] if select(results.records, phase="calibration") else []
    for workload in dict.fromkeys(r.workload for r in single):
        for mode in dict.fromkeys(r.mode for r in single):
            tables.append(single_table(results, workload, mode))
    if single:
        tables.append(serving_table(results))
    if select(results.records, phase="model"):
        tables.append(model_table(results))
    if select(results.records, phase="pass 1"):
        tables.append(two_pass_table(results))
    if results.cells:
        tables.append(load_table(results))
    if results.cancel is not None:
        tables.append(cancel_table(results))
    return tables

