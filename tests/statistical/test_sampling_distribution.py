"""Statistical tests: speculative sampling emits tokens distributed exactly like the target model.

Why this file exists: unit tests pin individual rules, but the claim that matters — "the output of
speculative sampling has the target distribution" (Chen et al. 2023, arXiv 2302.01318; Leviathan et al.
2023, arXiv 2211.17192) — is a statement about distributions, so it is tested with many seeded samples and
G-tests (`tests/statistical/gtest.py`) against the exact distribution, plus negative controls: plausible
wrong samplers that the *same* tests must reject, proving they have the power to catch real bugs.

The sampler under test is the production one, `rejection_sample_on_support`, fed packed rows exactly as
they come off the wire (each row's support; p and q packed separately, so their supports differ), row by
row as the orchestrator calls it. The vectorised reference `rejection_sample_batch` stays the oracle of
the unit tests.

The toy language model: a vocabulary of V tokens and first-order Markov models, so the next-token
distribution depends on the previous token (conditioning matters, and an off-by-one in which p row scores
which position changes the distribution):

* target p(. | prev) = warp(target_logits[prev]), draft q(. | prev) = warp(draft_logits[prev]) with
  draft_logits = target_logits + noise, the same SamplingParams for both. A second model has logits
  rounded to halves, so top-k meets ties.
* Each of N rows starts from token START and runs speculative rounds until it has emitted K+1 tokens;
  later rounds start from each row's last emitted token, as the real orchestrator does.
* Expected distributions are exact: y_1 ~ p(. | START); the pair (y_j, y_{j+1}) ~ pi_j(a) p(b | a) where
  pi_j is the target marginal at position j; and the joint of (y_1, y_2, y_3), every dependence at once.

Everything is seeded, so the suite is deterministic. Were the seeds changed, each test would raise a false
alarm with probability 1e-4 (the threshold); the negative controls land at p-values that underflow to 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from specdec.rows import PackedRows, pack_rows
from specdec.sampling import SamplingParams, rejection_sample_batch, rejection_sample_on_support, sample, warp
from specdec.speedup import acceptance_rate_alpha
from tests.statistical.gtest import P_THRESHOLD, GTest, g_test, joint_test, report

pytestmark = [pytest.mark.statistical, pytest.mark.usefixtures("single_torch_thread")]

V = 12
START = 0
ROWS = 24_000

_tables = torch.Generator().manual_seed(2302_01318)
TARGET_LOGITS = torch.randn(V, V, generator=_tables) * 1.5  # [V, V] row = previous token
DRAFT_LOGITS = TARGET_LOGITS + torch.randn(V, V, generator=_tables) * 1.0  # [V, V]


@dataclass(frozen=True)
class Model:
    target_logits: torch.Tensor  # [V, V]
    draft_logits: torch.Tensor  # [V, V]


PLAIN = Model(TARGET_LOGITS, DRAFT_LOGITS)
TIED = Model(torch.round(TARGET_LOGITS * 2) / 2, torch.round(DRAFT_LOGITS * 2) / 2)  # ties at top-k's edge

WARPS = {
    "temperature0.8": SamplingParams(temperature=0.8),
    "top_k4": SamplingParams(top_k=4),
    "top_p0.8": SamplingParams(top_p=0.8),
}

Sampler = Callable[
    [torch.Tensor, "torch.Tensor | None", torch.Tensor, Sequence[torch.Generator]], tuple[torch.Tensor, torch.Tensor]
]


def normalised(table: torch.Tensor) -> np.ndarray:
    t = table.double().numpy()
    return t / t.sum(axis=-1, keepdims=True)


class Production:
    """The orchestrator's sampler as a batch Sampler: row by row, on packed rows (their supports only)."""

    def __init__(self, target_table: torch.Tensor, q_table: torch.Tensor | None) -> None:
        self.p_values, self.p_index = pack_rows(target_table)  # [V, M_p] each: every table row packed once
        self.q_packed = None if q_table is None else pack_rows(q_table)

    def __call__(
        self, draft_tokens: torch.Tensor, ctx: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, k = draft_tokens.shape
        accepted = torch.empty(batch, dtype=torch.int64)
        tokens = torch.full((batch, k + 1), -1, dtype=torch.int64)
        rows, drafts = ctx.numpy(), draft_tokens.tolist()
        for b in range(batch):
            p_index = None if self.p_index is None else self.p_index[rows[b]]  # dense rows travel without one
            p = PackedRows.from_arrays(self.p_values[rows[b]], p_index, V)  # [K+1, V] as sent
            q = None
            if self.q_packed is not None:
                values, index = self.q_packed
                q = PackedRows.from_arrays(values[rows[b, :k]], None if index is None else index[rows[b, :k]], V)
            u = torch.rand(k + 1, dtype=torch.float64, generator=generators[b]).numpy()
            result = rejection_sample_on_support(drafts[b], q, p, u[:k], np.full(k + 1, u[k]))
            accepted[b] = result.accepted
            tokens[b, : len(result.tokens)] = torch.tensor(result.tokens)
        return accepted, tokens


def simulate(
    model: Model, params: SamplingParams, k: int, sampler: Sampler | None, fed_q_table: torch.Tensor | None, seed: int
) -> np.ndarray:
    """Run speculative rounds on ROWS rows until each has K+1 tokens -> emitted tokens [ROWS, K+1].

    ``sampler`` None is the production sampler; another one gets dense rows (a negative control). With
    `fed_q_table` [V, V] the draft samples from the warped draft table and the sampler is told q came from
    `fed_q_table` (the warped table for the correct algorithm; something else in a negative control). With
    None the draft is deterministic (argmax of the draft logits, like a lookup drafter) and q is None."""
    target_table = warp(model.target_logits, params)  # [V, V]
    draft_params = params if fed_q_table is not None else SamplingParams(temperature=0)
    draft_table = warp(model.draft_logits, draft_params)
    production = Production(target_table, fed_q_table) if sampler is None else None
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
        gens = [generators[i] for i in active.tolist()]
        if production is not None:
            accepted, tokens = production(x, ctx, gens)
        else:
            q = None if fed_q_table is None else fed_q_table[ctx[:, :k]]  # [A, K, V]
            accepted, tokens = sampler(x, q, target_table[ctx], gens)
        pos = count[active].unsqueeze(1) + offsets  # [A, K+1] output position of each emitted token
        keep = (offsets < (accepted + 1).unsqueeze(1)) & (pos < length)  # [A, K+1]
        rows = active.unsqueeze(1).expand_as(pos)
        out[rows[keep], pos[keep]] = tokens[keep]
        prev[active] = tokens[torch.arange(active.numel()), accepted]
        count[active] += accepted + 1
    return out.numpy()


def distribution_tests(model: Model, params: SamplingParams, tokens: np.ndarray) -> list[GTest]:
    """G-tests of y_1, of every adjacent pair (y_j, y_{j+1}), and of the joint (y_1, y_2, y_3)."""
    P = normalised(warp(model.target_logits, params))  # [V, V] exact target transition matrix
    marginal = P[START]  # [V] pi_1
    tests = [g_test("y1", np.bincount(tokens[:, 0], minlength=V), marginal, [str(t) for t in range(V)])]
    pair_labels = [f"({a},{b})" for a in range(V) for b in range(V)]
    for j in range(tokens.shape[1] - 1):
        joint = (marginal[:, None] * P).reshape(-1)  # [V*V] P(y_j = a, y_{j+1} = b)
        observed = np.bincount(tokens[:, j] * V + tokens[:, j + 1], minlength=V * V)
        tests.append(g_test(f"(y{j + 1},y{j + 2})", observed, joint, pair_labels))
        marginal = marginal @ P
    if tokens.shape[1] >= 3:
        first3 = P[START][:, None, None] * P[:, :, None] * P[None, :, :]  # [V, V, V] P(y1, y2, y3)
        tests.append(joint_test("(y1,y2,y3)", tokens[:, :3], first3))
    return tests


def run_case(
    params: SamplingParams,
    k: int,
    sampler: Sampler | None = None,
    fed_q_table: torch.Tensor | None = None,
    deterministic_draft: bool = False,
    model: Model = PLAIN,
) -> list[GTest]:
    """Sample, then G-test against the exact target: shared by positive and negative cases.

    By default the production sampler is told the true (warped) q; see `simulate` for the other modes."""
    fed = None if deterministic_draft else warp(model.draft_logits, params) if fed_q_table is None else fed_q_table
    tokens = simulate(model, params, k, sampler, fed, seed=1000 + k)
    assert (tokens >= 0).all() and (tokens < V).all()
    return distribution_tests(model, params, tokens)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("warp_name", list(WARPS))
def test_emitted_tokens_follow_target(warp_name: str, k: int) -> None:
    tests = run_case(WARPS[warp_name], k)
    text = report(f"positive {warp_name} K={k}", tests)
    assert all(t.pvalue >= P_THRESHOLD for t in tests), text


@pytest.mark.parametrize("params", [SamplingParams(top_k=3), SamplingParams(temperature=0.9, top_k=5)])
def test_ties_at_the_top_k_edge_follow_target(params: SamplingParams) -> None:
    """Rounded logits: several tokens tie at the k-th value, in p and in q (whose supports differ)."""
    assert any(len(set(row.tolist())) < V for row in TIED.target_logits), "no ties to test"
    tests = run_case(params, 3, model=TIED)
    text = report(f"positive tied {params} K=3", tests)
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
    """The production sampler, wrong q: told softmax(raw draft logits) while the draft sampled the warped q."""
    unwarped = torch.softmax(DRAFT_LOGITS, dim=-1)  # [V, V]
    warped = warp(DRAFT_LOGITS, params)
    gap = float((1 - acceptance_rate_alpha(unwarped, warped)).mean())
    assert gap > 0.1, f"warp too weak for a meaningful control: mean TV(unwarped, warped) = {gap:.3f}"
    tests = run_case(params, 3, fed_q_table=unwarped)
    text = report(f"negative unwarped-q {params} K=3", tests)
    assert min(t.pvalue for t in tests) < P_THRESHOLD, text
