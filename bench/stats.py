"""Rates, speedups and their 95% intervals: a paired bootstrap over the prompts both arms generated for.

Why this module exists: a speedup measured on a dozen prompts is an estimate; how far it could be off
depends on how much the prompts differ (a code edit copies more than another) and on the machine's noise.
Every ratio the report prints carries a 95% interval from the same procedure: resample the prompts (items)
with replacement, recompute both arms' aggregate rates on the same resampled items (pairing removes what
the prompts share), take the 2.5th and 97.5th percentiles of the ratio. Deterministic.

Generations that run at the same time share their noise: a load round's generations all meet the machine
as it was during that round (this VM's speed moves 10-20 % over seconds), so resampling them one by one
treats one draw of the machine as many and gives intervals several times too narrow (bench/README.md,
"Load"). Their ratios take the round as the unit instead (`clustered_ratio`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 4000


@dataclass(frozen=True)
class Estimate:
    """A ratio and its 95% interval."""

    value: float
    low: float
    high: float

    def __format__(self, spec: str) -> str:
        spec = spec or ".2f"
        if not math.isfinite(self.value):
            return "–"
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


NONE = Estimate(math.nan, math.nan, math.nan)


def rate(tokens: Sequence[float], seconds: Sequence[float]) -> float:
    """Aggregate tokens per second: all tokens over all time (long generations weigh more, as for a user)."""
    total = float(np.sum(seconds))
    return float(np.sum(tokens)) / total if total > 0 else math.nan


def _pooled(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> tuple[np.ndarray, ...]:
    """Both arms' tokens and seconds as arrays, and rate(a) / rate(b) over all items."""
    ta, sa = np.asarray(a, dtype=float).T
    tb, sb = np.asarray(b, dtype=float).T
    return ta, sa, tb, sb, rate(ta, sa) / rate(tb, sb)


def paired_ratio(
    a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]], resamples: int = RESAMPLES, seed: int = 0
) -> Estimate:
    """rate(a) / rate(b) with a 95% paired-bootstrap interval; a[i] and b[i] are (tokens, seconds) of item i
    under the two arms."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    if not a:
        return NONE
    ta, sa, tb, sb, value = _pooled(a, b)
    if len(a) == 1:
        return Estimate(value, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(a), size=(resamples, len(a)))
    ratios = (ta[picks].sum(1) / sa[picks].sum(1)) / (tb[picks].sum(1) / sb[picks].sum(1))
    low, high = np.percentile(ratios, [2.5, 97.5])
    return Estimate(value, float(low), float(high))


def clustered_ratio(
    a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]], clusters: Sequence[int]
) -> Estimate:
    """rate(a) / rate(b), with a 95% interval from the spread of the ratios cluster by cluster (``clusters[i]``:
    item i's, e.g. its load round): a t-interval on their logs, n - 1 degrees of freedom, around the pooled
    ratio. No interval from fewer than two clusters."""
    if not len(a) == len(b) == len(clusters):
        raise ValueError(f"paired samples and clusters need equal lengths, got {len(a)}, {len(b)}, {len(clusters)}")
    if not a:
        return NONE
    ta, sa, tb, sb, value = _pooled(a, b)
    groups = np.asarray(clusters)
    logs = [math.log(rate(ta[groups == g], sa[groups == g]) / rate(tb[groups == g], sb[groups == g]))
            for g in np.unique(groups)]
    if len(logs) < 2:
        return Estimate(value, math.nan, math.nan)
    from scipy.stats import t

    half = float(t.ppf(0.975, len(logs) - 1)) * float(np.std(logs, ddof=1)) / math.sqrt(len(logs))
    return Estimate(value, value * math.exp(-half), value * math.exp(half))


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan
