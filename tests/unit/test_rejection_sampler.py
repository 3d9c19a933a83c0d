"""`specdec.sampling`'s modified rejection sampling, reference and production (on the rows' supports).

Why this file exists: the sampler is the one place where a bug silently changes the output distribution
instead of crashing. These tests pin each rule of modified rejection sampling with constructed cases
(forced acceptance, forced rejection, greedy), cross-check the vectorised code against the naive oracle
in `tests/sampling_oracle.py` token for token, hold the production sampler (`rejection_sample_on_support`)
to the reference token for token, and check determinism. Distribution-level checks live in
`tests/statistical/`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specdec.rows import PackedRows, pack_rows
from specdec.sampling import (
    RejectionResult,
    SamplingParams,
    rejection_sample,
    rejection_sample_batch,
    rejection_sample_on_support,
    sample,
    warp,
)
from tests import sampling_oracle as oracle
from tests.fakes import gen, gens, random_logits, random_probs

pytestmark = pytest.mark.usefixtures("single_torch_thread")

V = 16


# ------------------------------------------------------------------------------------ rejection sampling


def draft_from(q: torch.Tensor, seed: int) -> torch.Tensor:
    """Draft tokens [K] sampled from q [K, V], as the draft model would."""
    return sample(q, gen(seed))


def test_all_accepted_when_p_equals_q_and_bonus_from_last_target_row() -> None:
    k = 4
    q = random_probs(k, V, seed=7)
    bonus_row = warp(random_logits(V, seed=8), SamplingParams(top_k=3))  # support of size 3
    p = torch.cat([q, bonus_row.unsqueeze(0)])
    for seed in range(200):
        x = draft_from(q, seed)
        result = rejection_sample(x, q, p, gen(1000 + seed))
        assert result.accepted == k, (seed, result)
        assert result.tokens[:k] == x.tolist()
        assert len(result.tokens) == k + 1
        assert bonus_row[result.tokens[k]] > 0, (seed, result.tokens[k])


def test_p_equals_q_accepts_every_draft_batched() -> None:
    b, k = 500, 5
    q = warp(random_logits(b, k, V, seed=9), SamplingParams(temperature=0.8, top_p=0.9))
    x = torch.stack([sample(q[i], gen(i)) for i in range(b)])
    p = torch.cat([q, random_probs(b, 1, V, seed=10)], dim=1)
    accepted, tokens = rejection_sample_batch(x, q, p, gens(b, 10_000))
    assert (accepted == k).all(), accepted.unique()
    assert torch.equal(tokens[:, :k], x)


@pytest.mark.parametrize("reject_at", [0, 1, 2])
def test_draft_with_zero_target_probability_is_always_rejected(reject_at: int) -> None:
    k = 3
    q = random_probs(k, V, seed=11)
    p = torch.cat([q, random_probs(1, V, seed=12)]).clone()
    x = torch.tensor([2, 5, 9])
    p[reject_at, x[reject_at]] = 0.0  # the target never produces this draft token here
    p[reject_at] /= p[reject_at].sum()
    residual = torch.clamp(p[reject_at] - q[reject_at], min=0)
    for seed in range(300):
        result = rejection_sample(x, q, p, gen(seed))
        assert result.accepted == reject_at, (seed, result)
        assert result.tokens[:reject_at] == x[:reject_at].tolist()
        recovered = result.tokens[reject_at]
        assert residual[recovered] > 0, (seed, recovered, residual)
        assert recovered != int(x[reject_at])


def test_all_zero_residual_falls_back_to_p() -> None:
    """p_0 == q_0 and a draft token with p = q = 0 there: rejected, residual all zero -> drawn from p_0."""
    row = torch.zeros(V)
    row[[1, 4, 6]] = torch.tensor([0.2, 0.5, 0.3])
    x = torch.tensor([9])  # outside the support of both rows
    q = row.unsqueeze(0)
    p = torch.stack([row, random_probs(V, seed=31)])
    b = 2000
    accepted, tokens = rejection_sample_batch(x.expand(b, 1), q.expand(b, 1, V), p.expand(b, 2, V), gens(b))
    assert (accepted == 0).all()
    drawn = tokens[:, 0]
    assert set(drawn.unique().tolist()) == {1, 4, 6}, torch.bincount(drawn, minlength=V)


def test_recovered_token_never_where_p_le_q() -> None:
    b = 20_000
    p0 = random_probs(V, seed=13)
    q0 = random_probs(V, seed=14)
    q0[:4] = p0[:4]  # some exact ties p == q: never recoverable either
    q0 /= q0.sum()
    x = sample(q0.expand(b, V).contiguous(), gen(15)).unsqueeze(-1)  # [B, 1]
    q = q0.expand(b, 1, V)
    p = torch.stack([p0, random_probs(V, seed=16)]).expand(b, 2, V)
    accepted, tokens = rejection_sample_batch(x, q, p, gens(b))
    rejected = accepted == 0
    recovered = tokens[rejected, 0]
    forbidden = p0 <= q0
    assert int(rejected.sum()) > 1000, int(rejected.sum())
    bad = forbidden[recovered]
    assert not bad.any(), f"recovered tokens where p <= q: {recovered[bad].unique().tolist()}"
    assert (tokens[rejected, 1] == -1).all()


@pytest.mark.parametrize("agree", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("explicit_q", [False, True])
def test_greedy_token_by_token(agree: int, explicit_q: bool) -> None:
    """Greedy: the draft agrees with argmax p for `agree` positions, then disagrees (or agrees to the end)."""
    k = 4
    greedy = SamplingParams(temperature=0.0)
    target_logits = random_logits(k + 1, V, seed=17 + agree)
    p = warp(target_logits, greedy)
    argmax_p = target_logits.argmax(-1)
    x = argmax_p[:k].clone()
    if agree < k:
        x[agree] = (x[agree] + 1) % V
    q = torch.nn.functional.one_hot(x, V).float() if explicit_q else None
    for seed in range(5):
        result = rejection_sample(x, q, p, gen(seed))
        assert result.accepted == agree
        assert result.tokens == argmax_p[: agree + 1].tolist()


def test_greedy_speculation_equals_greedy_target_only() -> None:
    """Decoding a fixed 'model' greedily: speculative rounds emit exactly the target's argmax chain."""
    table = random_logits(V, V, seed=18)  # next-token logits indexed by the previous token
    draft_table = table + random_logits(V, V, seed=19, scale=1.5)
    greedy = SamplingParams(temperature=0.0)
    reference = [0]
    for _ in range(30):
        reference.append(int(table[reference[-1]].argmax()))
    out, k = [0], 3
    while len(out) < len(reference):
        drafts = [out[-1]]
        for _ in range(k):
            drafts.append(int(warp(draft_table[drafts[-1]], greedy).argmax()))
        x = torch.tensor(drafts[1:])
        p = warp(table[torch.tensor(drafts)], greedy)  # [K+1, V]: rows given prefix + x_<i
        out += rejection_sample(x, None, p, gen(len(out))).tokens
    assert out[: len(reference)] == reference


def test_q_none_equals_explicit_one_hot() -> None:
    b, k = 300, 3
    p = warp(random_logits(b, k + 1, V, seed=21), SamplingParams(temperature=0.5))  # peaked rows
    x = sample(p[:, :k].reshape(-1, V), gen(20)).reshape(b, k)  # a deterministic draft that often agrees
    q_one_hot = torch.nn.functional.one_hot(x, V).float()
    a1, t1 = rejection_sample_batch(x, None, p, gens(b))
    a2, t2 = rejection_sample_batch(x, q_one_hot, p, gens(b))
    assert torch.equal(a1, a2) and torch.equal(t1, t2)
    assert 0 < int((a1 < k).sum()) < b  # both branches were exercised


def test_k_zero_is_target_only_sampling() -> None:
    p = random_probs(1, V, seed=22)
    result = rejection_sample(torch.empty(0, dtype=torch.int64), torch.empty(0, V), p, gen(0))
    assert result.accepted == 0 and len(result.tokens) == 1 and p[0, result.tokens[0]] > 0
    b = 2000
    accepted, tokens = rejection_sample_batch(torch.empty(b, 0, dtype=torch.int64), None, p.expand(b, 1, V), gens(b))
    assert tokens.shape == (b, 1) and (accepted == 0).all()
    assert (p[0, tokens[:, 0]] > 0).all()


@pytest.mark.parametrize("use_q", [True, False])
@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5), SamplingParams(top_p=0.8)]
)
def test_matches_sequential_oracle_token_for_token(use_q: bool, params: SamplingParams) -> None:
    """Same uniforms in, same tokens out: the vectorised sampler equals the naive Algorithm 2 on random rows."""
    b, k = 400, 4
    target_logits = random_logits(b, k + 1, V, seed=24)
    draft_logits = target_logits[:, :k] + random_logits(b, k, V, seed=23)  # a draft that roughly agrees
    q = warp(draft_logits, params)
    p = warp(target_logits, params)
    x = torch.stack([sample(q[i], gen(5000 + i)) for i in range(b)])
    q_arg = q if use_q else None
    accepted, tokens = rejection_sample_batch(x, q_arg, p, gens(b, 77))
    counts = torch.bincount(accepted, minlength=k + 1)
    assert (counts > 0).sum() >= 3, counts  # several acceptance lengths exercised
    for i in range(b):
        uniforms = torch.rand(k + 1, dtype=torch.float64, generator=gen(77 + i)).tolist()
        q_rows = None if q_arg is None else q[i].double().tolist()
        n, emitted = oracle.rejection_sample(x[i].tolist(), q_rows, p[i].double().tolist(), uniforms)
        assert int(accepted[i]) == n, (i, int(accepted[i]), n)
        assert tokens[i, : n + 1].tolist() == emitted, (i, tokens[i].tolist(), emitted)
        assert (tokens[i, n + 1 :] == -1).all()


def test_oracle_first_token_distribution_is_p() -> None:
    """The theorem, on the oracle's own arithmetic: whatever q is, the first emitted token ~ p0."""
    for seed in range(20):
        p0_t = warp(random_logits(V, seed=seed), SamplingParams(top_k=6)).double()
        q0_t = warp(random_logits(V, seed=seed + 100), SamplingParams(top_p=0.7)).double()
        p0, q0 = (p0_t / p0_t.sum()).tolist(), (q0_t / q0_t.sum()).tolist()  # exact float64 normalisation
        got = oracle.first_token_distribution(q0, p0)
        assert max(abs(a - b) for a, b in zip(got, p0)) < 1e-12


def test_seeded_determinism_and_batch_equals_single() -> None:
    b, k = 64, 5
    params = SamplingParams(temperature=0.9, top_k=8)
    q = warp(random_logits(b, k, V, seed=25), params)
    p = warp(random_logits(b, k + 1, V, seed=26), params)
    x = torch.stack([sample(q[i], gen(i)) for i in range(b)])
    first = [rejection_sample(x[i], q[i], p[i], gen(900 + i)) for i in range(b)]
    for _ in range(20):
        again = [rejection_sample(x[i], q[i], p[i], gen(900 + i)) for i in range(b)]
        assert again == first
    accepted, tokens = rejection_sample_batch(x, q, p, gens(b, 900))
    for i, single in enumerate(first):
        assert isinstance(single, RejectionResult)
        assert int(accepted[i]) == single.accepted
        assert tokens[i, : single.accepted + 1].tolist() == single.tokens
    assert len({r.accepted for r in first}) > 1


def test_each_row_consumes_exactly_k_plus_1_uniforms() -> None:
    k = 3
    q = random_probs(k, V, seed=27)
    p = random_probs(k + 1, V, seed=28)
    g = gen(5)
    rejection_sample(torch.tensor([1, 2, 3]), q, p, g)
    reference = gen(5)
    torch.rand(k + 1, dtype=torch.float64, generator=reference)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=reference))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"draft_tokens": torch.zeros(2, 3, dtype=torch.int64)}, "draft_tokens must have shape"),
        ({"q": torch.zeros(2, 3, V)}, "q must be a float tensor"),
        ({"p": torch.zeros(2, 3, V + 1)}, "q must be a float tensor"),
        ({"generators": gens(3)}, "need one generator per sequence"),
        ({"draft_tokens": torch.full((2, 2), V)}, "draft_tokens must be in"),
        ({"draft_tokens": torch.zeros(2, 2)}, "draft_tokens must be an integer tensor"),
    ],
)
def test_batch_rejects_bad_shapes(kwargs: dict, message: str) -> None:
    args = {
        "draft_tokens": torch.zeros(2, 2, dtype=torch.int64),
        "q": random_probs(2, 2, V),
        "p": random_probs(2, 3, V),
        "generators": gens(2),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        rejection_sample_batch(**args)


# --- on the support only ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 3, 5])
@pytest.mark.parametrize(
    "draft_params",
    [None, SamplingParams(temperature=0.9, top_p=0.8), SamplingParams(temperature=1.1, top_k=6), SamplingParams(1.0)],
    ids=["greedy-draft", "top-p", "top-k", "dense"],
)
def test_on_support_equals_the_full_width_sampler_token_for_token(k, draft_params):
    # Identical outputs for identical generator states: the support-only sampler inherits every guarantee
    # (and every statistical test) of rejection_sample. Widths differ on purpose (V_q < V_p, as when rows
    # are unpacked only as wide as their support), and the full-width call gets both padded with zeros.
    torch.manual_seed(k)
    vocab, narrow = 300, 260
    target_params = SamplingParams(temperature=0.8, top_p=0.9) if draft_params is not None else SamplingParams(0.0)
    for trial in range(40):
        p = warp(torch.randn(k + 1, vocab) * 2.5, target_params)  # [K+1, V]
        if draft_params is None:  # a greedy draft: q one-hot, sent as None
            q = None
            drafts = torch.randint(0, narrow, (k,)).tolist()
        else:
            q = warp(torch.randn(k, narrow) * 2.5, draft_params)  # [K, V_q]
            drafts = [int(torch.multinomial(row, 1)) for row in q] if k else []
        if trial % 2:  # often a draft the target would pick, so acceptances happen too
            drafts = [int(torch.argmax(row)) for row in p[:k]]
        padded_q = None if q is None else torch.nn.functional.pad(q, (0, vocab - narrow))
        seed = 1000 * k + trial
        full = rejection_sample(torch.tensor(drafts, dtype=torch.int64), padded_q, p, torch.Generator().manual_seed(seed))
        compact = rejection_sample_on_support(drafts, q, p, *uniforms_of(seed, k))
        assert compact == full, (trial, drafts)
        packed_p = PackedRows.from_arrays(*pack_rows(p), vocab)  # as the orchestrator receives them
        packed_q = None if q is None else PackedRows.from_arrays(*pack_rows(q), narrow)
        packed = rejection_sample_on_support(drafts, packed_q, packed_p, *uniforms_of(seed, k))
        assert packed == full, (trial, drafts)


def uniforms_of(seed: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference sampler's K+1 uniforms for ``seed``, as the production sampler takes them: acceptance
    for each draft position, and the one final uniform wherever the final draw lands."""
    u = torch.rand(k + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).numpy()
    return u[:k], np.full(k + 1, u[k])


def test_on_support_handles_a_draft_token_outside_every_support():
    p = torch.zeros(2, 10)
    p[:, 3] = 1.0  # greedy target: token 3
    result = rejection_sample_on_support([7], None, p, *uniforms_of(0, 1))
    assert result == RejectionResult(accepted=0, tokens=[3])  # 7 has p = 0: rejected, recovered from p
    with pytest.raises(ValueError, match="draft_tokens must be >= 0"):
        rejection_sample_on_support([-1], None, p, *uniforms_of(0, 1))
    with pytest.raises(ValueError, match="need 1 acceptance and 2 final uniforms"):
        rejection_sample_on_support([3], None, p, np.zeros(2), np.zeros(2))


def test_the_final_draw_uses_the_uniform_of_the_position_it_lands_on():
    p = torch.full((3, 4), 0.25)  # flat target rows
    u_final = np.array([0.1, 0.6, 0.9])
    # Draft 0 accepted (u 0 < p / q), draft 1 rejected (p(x) = 0.25 < u * 1): the final draw is at position 1.
    result = rejection_sample_on_support([2, 1], None, p, np.array([0.0, 0.99]), u_final)
    assert result.accepted == 1 and result.tokens[0] == 2
    residual = torch.tensor([0.25, 0.0, 0.25, 0.25])  # p minus the rejected one-hot draft
    assert result.tokens[1] == int(torch.searchsorted(residual.cumsum(0), 0.6 * residual.sum(), right=True))
