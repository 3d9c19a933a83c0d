"""Turn raw measurements into the benchmark's table: one row per (system, mode, K).

Why this module exists: the stack runs, the HF peer and the theory each produce raw numbers; every derived
quantity the report shows (medians and spread of ms/token, speedup over the same system's K = 0, the ideal
speedup and the efficiency, tokens per round, the per-round time split and bytes on the wire) is computed
here, once, from those raw numbers, so the Markdown table, the CSV and the figure cannot disagree.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from bench.peer import PeerRecord
from bench.stack_runs import ConfigRun
from bench.theory import Alpha, Costs, ideal_speedups
from specdec.speedup import expected_tokens_per_round

SPECDEC = "specdec"  # our stack, measured by a gRPC client
HF = "hf"  # Hugging Face generate in-process (K = 0 plain, K > 0 assisted)

NAN = math.nan


@dataclass(frozen=True)
class Row:
    """One (system, mode, K) of the table; per-round times are ms per speculative round."""

    system: str
    mode: str
    k: int
    generations: int
    tokens: int
    ms_per_token: float  # median over generations of wall time / generated tokens
    ms_per_token_q1: float  # spread: first and third quartiles over generations
    ms_per_token_q3: float
    tokens_per_s: float  # 1000 / ms_per_token
    speedup: float  # this system's K = 0 ms/token (same mode) / this ms/token
    ideal_speedup: float  # Leviathan with the measured α (this mode), c and v(K)
    efficiency: float  # speedup / ideal_speedup
    vs_hf: float = NAN  # our tokens/s / HF's at the same mode and K (specdec rows)
    tokens_per_round: float = NAN  # emitted (accepted + 1) per round; HF: generated tokens / target forwards
    tokens_per_round_norm: float = NAN  # tokens_per_round / (K + 1)
    expected_tokens_per_round: float = NAN  # theory with the measured α
    acceptance_rate: float = NAN  # accepted / drafted
    alpha_implied: float = NAN  # the α for which the theory predicts the measured tokens per round
    client_ms: float = NAN  # client wall time per round
    draft_ms: float = NAN  # orchestrator waiting on the draft service
    draft_compute_ms: float = NAN  # the draft's rounds under its model lock (its round histogram)
    target_ms: float = NAN  # orchestrator waiting on Triton
    triton_ms: float = NAN  # inside Triton (request received -> response ready)
    triton_compute_ms: float = NAN  # inside the Python model (input + infer + output)
    orchestrator_ms: float = NAN  # orchestrator's own time (sampling, bookkeeping)
    client_wire_ms: float = NAN  # client wall - orchestrator's total: the public hop
    overhead_ms: float = NAN  # client wall - draft compute - Triton compute: everything but the models
    overhead_pct: float = NAN  # overhead_ms / one in-process target step, in %
    overhead_pct_served: float = NAN  # overhead_ms / Triton's model time per K = 0 round (same mode), in %
    triton_vs_inprocess: float = NAN  # Triton model time / the same forward in-process (target step or v(K))
    draft_vs_inprocess: float = NAN  # draft compute / K in-process draft steps
    mb_per_round: float = NAN  # probability rows sent per round by the draft (q) and Triton (p), measured
    fallback_rounds: int = 0  # rounds the orchestrator ran target-only because the draft failed


@dataclass(frozen=True)
class Summary:
    """Everything the report renders."""

    rows: tuple[Row, ...]
    alphas: dict[str, Alpha]  # mode -> α measured on the target's own (K = 0) generations
    costs: Costs
    ideal: dict[str, dict[int, float]]  # mode -> K -> ideal speedup
    vocab_size: int
    settings: dict[str, str] = field(default_factory=dict)  # shown in the report's header

    def row(self, system: str, mode: str, k: int) -> Row | None:
        return next((r for r in self.rows if (r.system, r.mode, r.k) == (system, mode, k)), None)

    def best(self, system: str, mode: str) -> Row | None:
        """The speculative row (K > 0) with the highest measured speedup."""
        rows = [r for r in self.rows if r.system == system and r.mode == mode and r.k > 0]
        return max(rows, key=lambda r: r.speedup) if rows else None


def implied_alpha(tokens_per_round: float, k: int) -> float:
    """The α at which E[tokens per round] = (1 - α^(K+1)) / (1 - α) equals the measurement (bisection)."""
    if k == 0 or not math.isfinite(tokens_per_round):
        return NAN
    if tokens_per_round <= 1.0:
        return 0.0
    if tokens_per_round >= k + 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens_per_round(mid, k) < tokens_per_round else (lo, mid)
    return (lo + hi) / 2


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return median, q1, q3


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else NAN


def _base_row(system: str, mode: str, k: int, per_token: list[float], tokens: int, ideal: float) -> Row:
    median, q1, q3 = _quartiles(per_token)
    return Row(system=system, mode=mode, k=k, generations=len(per_token), tokens=tokens, ms_per_token=median,
               ms_per_token_q1=q1, ms_per_token_q3=q3, tokens_per_s=_ratio(1000.0, median),
               speedup=NAN, ideal_speedup=ideal, efficiency=NAN)


def stack_rows(runs: Iterable[ConfigRun], ideal: dict[str, dict[int, float]], alphas: dict[str, Alpha],
               costs: Costs) -> list[Row]:
    rows = []
    for run in runs:
        recs = run.records
        rounds = sum(r.rounds for r in recs)

        def per_round(total: float, rounds: int = rounds) -> float:
            return _ratio(total, rounds)

        row = _base_row(SPECDEC, run.mode, run.k, [r.wall_ms / r.tokens for r in recs if r.tokens],
                        sum(r.tokens for r in recs), ideal[run.mode].get(run.k, NAN))
        servers = run.servers
        client = per_round(sum(r.wall_ms for r in recs))
        draft = per_round(sum(r.draft_ms for r in recs))
        draft_compute = per_round(servers.draft_round_s * 1e3) if servers.draft_rounds else (0.0 if run.k == 0 else NAN)
        triton_compute = per_round(servers.triton_compute_ns / 1e6) if servers.triton_requests else NAN
        model_time = (draft if math.isnan(draft_compute) else draft_compute) + triton_compute
        overhead = client - model_time
        emitted = per_round(sum(r.accepted + r.rounds for r in recs))
        drafted = sum(r.drafted for r in recs)
        alpha = alphas[run.mode].mean
        rows.append(replace(
            row,
            tokens_per_round=emitted,
            tokens_per_round_norm=emitted / (run.k + 1),
            expected_tokens_per_round=expected_tokens_per_round(alpha, run.k) if math.isfinite(alpha) else NAN,
            acceptance_rate=_ratio(sum(r.accepted for r in recs), drafted),
            alpha_implied=implied_alpha(emitted, run.k),
            client_ms=client, draft_ms=draft, draft_compute_ms=draft_compute,
            target_ms=per_round(sum(r.target_ms for r in recs)),
            triton_ms=per_round(servers.triton_success_ns / 1e6) if servers.triton_requests else NAN,
            triton_compute_ms=triton_compute,
            orchestrator_ms=per_round(sum(r.orchestrator_ms for r in recs)),
            client_wire_ms=per_round(sum(r.wall_ms - r.total_ms for r in recs)),
            overhead_ms=overhead, overhead_pct=100.0 * _ratio(overhead, costs.target_step_ms),
            triton_vs_inprocess=_ratio(triton_compute, costs.target_step_ms * costs.verify_cost_ratio(run.k)),
            draft_vs_inprocess=_ratio(draft_compute, run.k * costs.draft_step_ms) if run.k else NAN,
            mb_per_round=per_round(servers.draft_q_bytes + servers.triton_output_bytes) / 1e6,
            fallback_rounds=sum(r.fallback_rounds for r in recs),
        ))
    return rows


def peer_rows(records: Iterable[PeerRecord], ideal: dict[str, dict[int, float]]) -> list[Row]:
    groups: dict[tuple[str, int], list[PeerRecord]] = {}
    for rec in records:
        groups.setdefault((rec.mode, rec.k), []).append(rec)
    rows = []
    for (mode, k), recs in groups.items():
        row = _base_row(HF, mode, k, [r.wall_ms / r.tokens for r in recs if r.tokens], sum(r.tokens for r in recs),
                        ideal[mode].get(k, NAN))
        per_round = _ratio(sum(r.tokens for r in recs), sum(r.rounds for r in recs))
        rows.append(replace(row, tokens_per_round=per_round, tokens_per_round_norm=per_round / (k + 1),
                            alpha_implied=implied_alpha(per_round, k)))
    return rows


def with_ratios(rows: list[Row]) -> list[Row]:
    """Fill speedup (vs the same system's K = 0), efficiency, vs_hf and overhead_pct_served.

    overhead_pct_served divides by the target step as served (Triton's model time per K = 0 round), which the
    stack measured minutes from the in-process step but interleaved with the overhead itself, so this
    machine's drift between phases cancels out of it."""
    index = {(r.system, r.mode, r.k): r for r in rows}
    out = []
    for r in rows:
        base = index.get((r.system, r.mode, 0))
        speedup = _ratio(base.ms_per_token, r.ms_per_token) if base else NAN
        hf = index.get((HF, r.mode, r.k))
        vs_hf = _ratio(hf.ms_per_token, r.ms_per_token) if (hf and r.system == SPECDEC) else NAN
        served = 100.0 * _ratio(r.overhead_ms, base.triton_compute_ms) if base else NAN
        out.append(replace(r, speedup=speedup, efficiency=_ratio(speedup, r.ideal_speedup), vs_hf=vs_hf,
                           overhead_pct_served=served))
    order = {SPECDEC: 0, HF: 1}
    return sorted(out, key=lambda r: (order.get(r.system, 2), r.mode, r.k))


def summarize(
    runs: Sequence[ConfigRun],
    peer: Sequence[PeerRecord],
    alphas: dict[str, Alpha],
    costs: Costs,
    ks: Sequence[int],
    vocab_size: int,
    settings: dict[str, str] | None = None,
) -> Summary:
    """Build the table: stack rows, peer rows, ideal speedups, and the ratios between them."""
    ideal = {mode: ideal_speedups(a.mean, costs, ks) if math.isfinite(a.mean) else {} for mode, a in alphas.items()}
    rows = with_ratios(stack_rows(runs, ideal, alphas, costs) + peer_rows(peer, ideal))
    return Summary(tuple(rows), dict(alphas), costs, ideal, vocab_size, dict(settings or {}))
