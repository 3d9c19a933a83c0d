"""G-tests against exact distributions, shared by the statistical tests in-process and through the stack.

A G-test (log-likelihood ratio) compares observed counts with the exact probabilities of their cells; cells
with an expected count below MIN_EXPECTED are pooled. An observation in a cell of probability exactly 0 is
impossible under the null hypothesis: G = inf, p = 0. Each positive case must reach p >= P_THRESHOLD on
every test; each negative control (a plausible wrong sampler) must fall below it on at least one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

P_THRESHOLD = 1e-4
MIN_EXPECTED = 5.0


@dataclass(frozen=True)
class GTest:
    """One goodness-of-fit test: G statistic, degrees of freedom, p-value and the cells behind them."""

    name: str
    statistic: float
    dof: int
    pvalue: float
    observed: np.ndarray  # [C] pooled observed counts
    expected: np.ndarray  # [C] pooled expected counts
    labels: list[str]  # [C] cell names

    def describe(self, worst: int = 6) -> str:
        dev = (self.observed - self.expected) / np.sqrt(np.maximum(self.expected, 1e-12))
        order = np.argsort(-np.abs(dev))[:worst]
        cells = ", ".join(
            f"{self.labels[i]}: obs {int(self.observed[i])} exp {self.expected[i]:.1f}" for i in order
        )
        return f"{self.name}: G={self.statistic:.2f} dof={self.dof} p={self.pvalue:.3g} [worst cells: {cells}]"


def g_test(name: str, counts: np.ndarray, probs: np.ndarray, labels: list[str]) -> GTest:
    """G-test of observed `counts` [C] against exact cell probabilities `probs` [C].

    Cells with expected count < MIN_EXPECTED are pooled into one cell (merged into the smallest other cell
    if the pool is still too small). An observation in a cell of probability exactly 0 is impossible
    under the null hypothesis: reported as G = inf, p = 0."""
    n = counts.sum()
    expected = probs / probs.sum() * n
    impossible = (probs == 0) & (counts > 0)
    if impossible.any():
        bad = [labels[i] for i in np.flatnonzero(impossible)]
        return GTest(f"{name} (impossible cells observed: {bad})", math.inf, 0, 0.0, counts, expected, labels)
    small = expected < MIN_EXPECTED
    obs = list(counts[~small].astype(np.float64))
    exp = list(expected[~small])
    lab = [labels[i] for i in np.flatnonzero(~small)]
    pooled_exp, pooled_obs = float(expected[small].sum()), float(counts[small].sum())
    if pooled_exp >= MIN_EXPECTED:
        obs.append(pooled_obs)
        exp.append(pooled_exp)
        lab.append("pooled")
    elif pooled_exp > 0 or pooled_obs > 0:
        j = int(np.argmin(exp))
        obs[j] += pooled_obs
        exp[j] += pooled_exp
        lab[j] += "+pooled"
    obs_a, exp_a = np.array(obs), np.array(exp)
    if len(obs_a) < 2:
        return GTest(name, 0.0, 0, 1.0, obs_a, exp_a, lab)
    statistic, pvalue = stats.power_divergence(obs_a, exp_a, lambda_="log-likelihood")
    return GTest(name, float(statistic), len(obs_a) - 1, float(pvalue), obs_a, exp_a, lab)


def joint_test(name: str, samples: np.ndarray, probs: np.ndarray) -> GTest:
    """G-test of whole samples [N, L] (tokens in [0, V)) against their exact joint distribution, ``probs``
    [V, ..., V] (L axes): the dependence between every position, not only adjacent ones."""
    vocab, length = probs.shape[0], samples.shape[1]
    cells = np.ravel_multi_index(samples.T, (vocab,) * length)
    counts = np.bincount(cells, minlength=vocab**length)
    labels = [str(tuple(np.unravel_index(i, (vocab,) * length))) for i in range(vocab**length)]
    return g_test(name, counts, probs.reshape(-1), labels)


def report(label: str, tests: list[GTest]) -> str:
    lines = [f"{label}: min p = {min(t.pvalue for t in tests):.3g}"] + ["  " + t.describe() for t in tests]
    text = "\n".join(lines)
    print(text)  # visible with -s; the same text is the assertion message on failure
    return text
