"""Statistical tests: speculative sampling emits tokens distributed exactly like the target model.

Why this file exists: unit tests pin individual rules, but the claim that matters — "the output of
speculative sampling has the target distribution" (Chen et al. 2023, arXiv 2302.01318; Leviathan et al.
2023, arXiv 2211.17192) — is a statement about distributions, so it is tested with many seeded samples and a
G-test (log-likelihood ratio) against the exact distribution, plus negative controls: plausible-looking
wrong samplers that the *same* test must reject, proving it has the power to catch real bugs.

The toy language model: a vocabulary of V tokens and first-order Markov models, so the next-token
distribution depends on the previous token (conditioning matters, and an off-by-one in which p row
scores which position changes the distribution):

* target p(. | prev) = warp(TARGET_LOGITS[prev]), draft q(. | prev) = warp(DRAFT_LOGITS[prev]) with
  DRAFT_LOGITS = TARGET_LOGITS + noise (a draft that roughly agrees, as real drafts do), and the same
  SamplingParams applied to both.
* Each of N rows starts from token START and runs speculative rounds (draft K tokens from warped q,
  score K+1 positions with p, rejection-sample) until it has emitted at least K+1 tokens; later
  rounds start from each row's last emitted token, as the real orchestrator does.
* Expected distributions are exact: y_1 ~ p(. | START); the pair (y_j, y_{j+1}) ~ pi_j(a) p(b | a) where
  pi_j is the target marginal at position j (pi_{j+1} = pi_j P). Testing every adjacent pair tests every
  output position 1..K+1 conditioned on its predecessor.

Also covered: a deterministic drafter (argmax, q passed as None) under a sampling target. Negative
controls, run through the very same `run_case` + G-tests: an always-accept sampler, a sampler that draws
the recovered token from p_n instead of the residual, and the correct sampler fed the un-warped q while
the draft sampled from the warped q.

Everything is seeded, so the suite is deterministic. Were the seeds changed, each test would raise a
false alarm with probability 1e-4 (the threshold), about 0.5% for the ~50 tests of this file; the negative
controls land at p-values that underflow to 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy import stats

from specdec.sampling import SamplingParams, rejection_sample_batch, sample, warp
from specdec.speedup import acceptance_rate_alpha

pytestmark = [pytest.mark.statistical, pytest.mark.usefixtures("single_torch_thread")]

V = 12
START = 0
ROWS = 30_000
P_THRESHOLD = 1e-4
MIN_EXPECTED = 5.0

_tables = torch.Generator().manual_seed(2302_01318)
TARGET_LOGITS = torch.randn(V, V, generator=_tables) * 1.5  # [V, V] row = previous token
DRAFT_LOGITS = TARGET_LOGITS + torch.randn(V, V, generator=_tables) * 1.0  # [V, V]

WARPS = {
    "temperature0.8": SamplingParams(temperature=0.8),
    "top_k4": SamplingParams(top_k=4),
    "top_p0.8": SamplingParams(top_p=0.8),
}


Sampler = Callable[
    [torch.Tensor, "torch.Tensor | None", torch.Tensor, Sequence[torch.Generator]], tuple[torch.Tensor, torch.Tensor]
]


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


def normalised(table: torch.Tensor) -> np.ndarray:
    t = table.double().numpy()
    return t / t.sum(axis=-1, keepdims=True)


def simulate(
    params: SamplingParams, k: int, sampler: Sampler, fed_q_table: torch.Tensor | None, seed: int
) -> np.ndarray:
    """Run speculative rounds on ROWS rows until each has K+1 tokens -> emitted tokens [ROWS, K+1].

    With `fed_q_table` [V, V] the draft samples from the warped draft table and the sampler is told q
    came from `fed_q_table` (the warped table for the correct algorithm; something else in a negative
    control). With None the draft is deterministic (argmax of the draft logits, like an n-gram or
    prompt-lookup drafter) and the sampler gets q=None (one-hot)."""
    target_table = warp(TARGET_LOGITS, params)  # [V, V]
    draft_table = warp(DRAFT_LOGITS, params if fed_q_table is not None else SamplingParams(temperature=0))
    length = k + 1
    draft_gen = torch.Generator().manual_seed(seed)
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(ROWS)]
    out = torch.full((ROWS, length), -1, dtype=torch.int64)  # [N, K+1]
    count = torch.zeros(ROWS, dtype=torch.int64)  # [N] tokens emitted so far
    prev = torch.full((ROWS,), START, dtype=torch.int64)  # [N] last emitted token
    offsets = torch.arange(k + 1)  # [K+1]
    while (active := torch.nonzero(count < length).flatten()).numel():
        context = [prev[active]]  # contexts of positions 0..K: [prev, x_0, .., x_{K-1}], each [A]
        for _ in range(k):
            context.append(sample(draft_table[context[-1]], draft_gen))
        ctx = torch.stack(context, dim=1)  # [A, K+1]
        x = ctx[:, 1:]  # [A, K] draft tokens
        q = None if fed_q_table is None else fed_q_table[ctx[:, :k]]  # [A, K, V]
        accepted, tokens = sampler(x, q, target_table[ctx], [generators[i] for i in active.tolist()])
        pos = count[active].unsqueeze(1) + offsets  # [A, K+1] output position of each emitted token
        keep = (offsets < (accepted + 1).unsqueeze(1)) & (pos < length)  # [A, K+1]
        rows = active.unsqueeze(1).expand_as(pos)
        out[rows[keep], pos[keep]] = tokens[keep]
        prev[active] = tokens[torch.arange(active.numel()), accepted]
        count[active] += accepted + 1
    return out.numpy()


def distribution_tests(params: SamplingParams, tokens: np.ndarray) -> list[GTest]:
    """G-tests of y_1 against p(. | START) and of every adjacent pair (y_j, y_{j+1}) against the target."""
    P = normalised(warp(TARGET_LOGITS, params))  # [V, V] exact target transition matrix
    marginal = P[START]  # [V] pi_1
    tests = [g_test("y1", np.bincount(tokens[:, 0], minlength=V), marginal, [str(t) for t in range(V)])]
    pair_labels = [f"({a},{b})" for a in range(V) for b in range(V)]
    for j in range(tokens.shape[1] - 1):
        joint = (marginal[:, None] * P).reshape(-1)  # [V*V] P(y_j = a, y_{j+1} = b)
        observed = np.bincount(tokens[:, j] * V + tokens[:, j + 1], minlength=V * V)
        tests.append(g_test(f"(y{j + 1},y{j + 2})", observed, joint, pair_labels))
        marginal = marginal @ P
    return tests


def run_case(
    params: SamplingParams,
    k: int,
    sampler: Sampler = rejection_sample_batch,
    fed_q_table: torch.Tensor | None = None,
    deterministic_draft: bool = False,
) -> list[GTest]:
    """Sample with `sampler`, then G-test against the exact target: shared by positive and negative cases.

    By default the sampler is told the true (warped) q; see `simulate` for the other two modes."""
    fed = None if deterministic_draft else warp(DRAFT_LOGITS, params) if fed_q_table is None else fed_q_table
    tokens = simulate(params, k, sampler, fed, seed=1000 + k)
    assert (tokens >= 0).all() and (tokens < V).all()
    return distribution_tests(params, tokens)


def report(label: str, tests: list[GTest]) -> str:
    lines = [f"{label}: min p = {min(t.pvalue for t in tests):.3g}"] + ["  " + t.describe() for t in tests]
    text = "\n".join(lines)
    print(text)  # visible with -s; the same text is the assertion message on failure
    return text


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("warp_name", list(WARPS))
def test_emitted_tokens_follow_target(warp_name: str, k: int) -> None:
    params = WARPS[warp_name]
    tests = run_case(params, k)
    text = report(f"positive {warp_name} K={k}", tests)
    assert all(t.pvalue >= P_THRESHOLD for t in tests), text


@pytest.mark.parametrize("warp_name", ["temperature0.8", "top_p0.8"])
def test_deterministic_draft_with_q_none_follows_target(warp_name: str) -> None:
    """A deterministic drafter (q one-hot, passed as None) under a sampling target: still exact."""
    tests = run_case(WARPS[warp_name], 3, deterministic_draft=True)
    text = report(f"positive deterministic-draft {warp_name} K=3", tests)
    assert all(t.pvalue >= P_THRESHOLD for t in tests), text


def always_accept(
    draft_tokens: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor, generators: Sequence[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative control: emit every draft token plus a bonus from p[K], never rejecting."""
    batch, k = draft_tokens.shape
    bonus = sample(p[:, k], generators[0])  # [B]
    return torch.full((batch,), k, dtype=torch.int64), torch.cat([draft_tokens, bonus.unsqueeze(1)], dim=1)


def resample_from_p(
    draft_tokens: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor, generators: Sequence[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative control, a classic bug: correct acceptance, but the recovered token is drawn from p_n
    instead of norm(max(0, p_n - q_n))."""
    accepted, tokens = rejection_sample_batch(draft_tokens, q, p, generators)
    rows = torch.arange(accepted.numel())
    rejected = accepted < draft_tokens.shape[1]
    from_p = sample(p[rows, accepted], generators[0])  # [B]
    tokens[rows[rejected], accepted[rejected]] = from_p[rejected]
    return accepted, tokens


@pytest.mark.parametrize("warp_name", list(WARPS))
def test_negative_control_always_accept_is_rejected(warp_name: str) -> None:
    tests = run_case(WARPS[warp_name], 3, sampler=always_accept)
    text = report(f"negative always-accept {warp_name} K=3", tests)
    assert min(t.pvalue for t in tests) < P_THRESHOLD, text


@pytest.mark.parametrize("warp_name", list(WARPS))
def test_negative_control_recovered_from_p_is_rejected(warp_name: str) -> None:
    tests = run_case(WARPS[warp_name], 3, sampler=resample_from_p)
    text = report(f"negative recovered-from-p {warp_name} K=3", tests)
    assert min(t.pvalue for t in tests) < P_THRESHOLD, text


@pytest.mark.parametrize(
    "params", [SamplingParams(top_k=4), SamplingParams(temperature=0.5)], ids=["top_k4", "temperature0.5"]
)
def test_negative_control_unwarped_q_is_rejected(params: SamplingParams) -> None:
    """Correct algorithm, wrong q: told softmax(raw draft logits) while the draft sampled the warped q."""
    unwarped = torch.softmax(DRAFT_LOGITS, dim=-1)  # [V, V]
    warped = warp(DRAFT_LOGITS, params)
    gap = float((1 - acceptance_rate_alpha(unwarped, warped)).mean())
    assert gap > 0.1, f"warp too weak for a meaningful control: mean TV(unwarped, warped) = {gap:.3f}"
    tests = run_case(params, 3, fed_q_table=unwarped)
    text = report(f"negative unwarped-q {params} K=3", tests)
    assert min(t.pvalue for t in tests) < P_THRESHOLD, text
