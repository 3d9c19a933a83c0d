"""Rates, speedups and their 95% intervals: a paired bootstrap over the prompts both arms generated for.

Why this module exists: a speedup measured on a dozen prompts is an estimate; how far it could be off
depends on how much the prompts differ (a code edit copies more than another) and on the machine's noise.
Every ratio the report prints carries a 95% interval from the same procedure: resample the prompts (items)
with replacement, recompute both arms' aggregate rates on the same resampled items (pairing removes what
the prompts share), take the 2.5th and 97.5th percentiles of the ratio. Pure numpy; deterministic.
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


def paired_ratio(
    a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]], resamples: int = RESAMPLES, seed: int = 0
) -> Estimate:
    """rate(a) / rate(b) with a 95% paired-bootstrap interval; a[i] and b[i] are (tokens, seconds) of item i
    under the two arms."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    if not a:
        return NONE
    ta, sa = np.asarray(a, dtype=float).T
    tb, sb = np.asarray(b, dtype=float).T
    value = rate(ta, sa) / rate(tb, sb)
    if len(a) == 1:
        return Estimate(value, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(a), size=(resamples, len(a)))
    ratios = (ta[picks].sum(1) / sa[picks].sum(1)) / (tb[picks].sum(1) / sb[picks].sum(1))
    low, high = np.percentile(ratios, [2.5, 97.5])
    return Estimate(value, float(low), float(high))


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan
