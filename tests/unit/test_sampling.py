"""`specdec.sampling_params` and `specdec.sampling.warp` / `sample`: the settings and the warping of logits.

The warping must be exactly the same on the draft (q) and the target (p): each rule (temperature, top-k
with ties, top-p's minimal set, greedy's first argmax) is pinned with constructed cases and cross-checked
against the naive oracle in `tests/sampling_oracle.py`.
"""

from __future__ import annotations

import pytest
import torch

from specdec.rows import pack_rows
from specdec.sampling import SamplingParams, sample, warp, warp_packed
from tests import sampling_oracle as oracle
from tests.fakes import gen, random_logits

pytestmark = pytest.mark.usefixtures("single_torch_thread")

V = 16


# --------------------------------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
        ({"temperature": float("nan")}, "temperature must be finite, got nan"),
        ({"temperature": float("inf")}, "temperature must be finite, got inf"),
        ({"top_p": 0.0}, "top_p must be in (0, 1] (1 disables it), got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1] (1 disables it), got 1.5"),
        ({"top_p": -0.1}, "top_p must be in (0, 1] (1 disables it), got -0.1"),
        ({"top_p": float("nan")}, "top_p must be in (0, 1] (1 disables it), got nan"),
        ({"top_k": -1}, "top_k must be >= 0 (0 disables it), got -1"),
        ({"top_k": 2.5}, "top_k must be an integer, got 2.5"),
        ({"top_k": True}, "top_k must be an integer, got True"),
        ({"temperature": "1"}, "temperature must be a number, got '1'"),
    ],
)
def test_sampling_params_rejects_invalid_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(**kwargs)
    assert str(excinfo.value) == message


def test_sampling_params_accepts_valid_values_and_greedy_flag() -> None:
    assert SamplingParams().greedy is False
    assert SamplingParams(temperature=0).greedy is True
    assert SamplingParams(temperature=0.0, top_k=5, top_p=1.0).greedy is True
    SamplingParams(temperature=2, top_k=0, top_p=1e-9)  # boundaries that are allowed


def test_validate_for_vocab() -> None:
    SamplingParams(top_k=V).validate_for_vocab(V)
    with pytest.raises(ValueError, match=f"top_k must be <= vocab size {V}, got {V + 1}"):
        SamplingParams(top_k=V + 1).validate_for_vocab(V)
    logits = random_logits(2, V, seed=5)
    assert torch.equal(warp(logits, SamplingParams(top_k=V + 1)), warp(logits, SamplingParams()))  # keeps all


# ------------------------------------------------------------------------------------------------ warp


def test_warp_temperature_only_is_softmax_of_scaled_logits() -> None:
    logits = random_logits(4, V)
    for t in (0.3, 1.0, 2.5):
        expected = torch.softmax(logits / t, dim=-1)
        torch.testing.assert_close(warp(logits, SamplingParams(temperature=t)), expected)


@pytest.mark.parametrize("k", [1, 3, V - 1, V])
def test_warp_top_k_keeps_exactly_k_largest(k: int) -> None:
    logits = random_logits(8, V, seed=1)
    probs = warp(logits, SamplingParams(top_k=k))
    assert ((probs > 0).sum(-1) == k).all(), (probs > 0).sum(-1)
    top_idx = torch.topk(logits, k, dim=-1).indices
    assert (probs.gather(-1, top_idx) > 0).all()


def test_warp_top_k_with_ties_keeps_exactly_k() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    probs = warp(logits, SamplingParams(top_k=2))
    assert int((probs > 0).sum()) == 2
    assert probs[0, 0] == 0 and probs[0, 4] == 0


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.4, {0}), (0.75, {0, 1}), (0.81, {0, 1, 2}), (0.99, {0, 1, 2, 3})],
)
def test_warp_top_p_keeps_minimal_set_on_known_distribution(top_p: float, kept: set[int]) -> None:
    base = torch.tensor([0.5, 0.3, 0.15, 0.05])
    perm = torch.tensor([2, 0, 3, 1])  # token perm[j] has probability base[j]
    logits = torch.empty(4)
    logits[perm] = base.log()
    probs = warp(logits, SamplingParams(top_p=top_p))
    expected_support = {int(perm[j]) for j in kept}
    assert {int(t) for t in torch.nonzero(probs).flatten()} == expected_support
    expected = torch.zeros(4)
    expected[perm[sorted(kept)]] = base[sorted(kept)] / base[sorted(kept)].sum()
    torch.testing.assert_close(probs, expected)


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_warp_top_p_set_is_minimal_property(top_p: float, temperature: float) -> None:
    """The kept set has mass >= top_p, dropping its least likely member goes below, nothing outside beats it."""
    logits = random_logits(64, V, seed=2)
    probs = warp(logits, SamplingParams(temperature=temperature, top_p=top_p))
    full = torch.softmax(logits.double() / temperature, dim=-1)
    for row in range(logits.shape[0]):
        kept = probs[row] > 0
        mass = float(full[row][kept].sum())
        smallest = float(full[row][kept].min())
        assert mass >= top_p - 1e-6, (row, mass)
        assert mass - smallest < top_p + 1e-6, (row, mass, smallest)
        if (~kept).any():
            assert float(full[row][~kept].max()) <= smallest + 1e-9


def test_warp_greedy_is_one_hot_at_first_argmax() -> None:
    logits = random_logits(5, V, seed=3)
    logits[0, 3] = logits[0, 7] = logits[0].max() + 1.0  # tie: first index wins
    probs = warp(logits, SamplingParams(temperature=0.0, top_k=4, top_p=0.5))
    assert probs.dtype == torch.float32
    assert ((probs == 0) | (probs == 1)).all() and (probs.sum(-1) == 1).all()
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))
    assert int(probs[0].argmax()) == 3


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=0.8, top_p=0.8),
        SamplingParams(temperature=1.0, top_k=6, top_p=0.7),
        SamplingParams(temperature=0.0),
    ],
)
def test_warp_matches_oracle_and_rows_sum_to_one(params: SamplingParams) -> None:
    logits = random_logits(3, 7, V, seed=4)  # leading batch dims are allowed
    probs = warp(logits, params)
    assert probs.shape == logits.shape and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 7))
    for row_logits, row_probs in zip(logits.reshape(-1, V), probs.reshape(-1, V)):
        expected = oracle.warp_row(row_logits.tolist(), params.temperature, params.top_k, params.top_p)
        torch.testing.assert_close(row_probs.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale", [0.2, 2.0, 6.0])  # flat (full sort), medium and peaked (top-k candidates)
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
def test_wide_vocab_top_p_matches_the_oracle(scale: float, top_p: float) -> None:
    """Rows wider than the candidate window (256, 4096) take the topk path; it must equal a full sort."""
    wide = 6000
    logits = torch.randn(2, wide, generator=torch.Generator().manual_seed(11)) * scale
    logits[1, 100:400] = logits[1, 99]  # a block of exact ties straddling the candidate window
    probs = warp(logits, SamplingParams(temperature=1.0, top_p=top_p))
    for row_logits, row_probs in zip(logits, probs):
        expected = oracle.warp_row(row_logits.tolist(), 1.0, 0, top_p)
        kept = [i for i, v in enumerate(expected) if v > 0]
        assert torch.nonzero(row_probs).flatten().tolist() == kept
        torch.testing.assert_close(row_probs.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("vocab", [2, 3, 1000])
@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_p=0.8, top_k=20)], ids=["greedy", "sampled"]
)
def test_warp_packed_is_warp_then_pack_rows(vocab: int, params: SamplingParams) -> None:
    logits = torch.randint(-3, 3, (64, vocab), generator=gen(7)).to(torch.bfloat16)  # many ties, a narrow dtype
    logits[0] = float("-inf")
    logits[1, vocab // 2] = float("nan")  # argmax counts NaN as the largest, in warp and here alike
    values, index = warp_packed(logits, params)
    expected_values, expected_index = pack_rows(warp(logits, params))
    assert values.dtype == expected_values.dtype and values.tobytes() == expected_values.tobytes()
    assert (index is None) == (expected_index is None)
    if index is not None:
        assert index.dtype == expected_index.dtype and index.tobytes() == expected_index.tobytes()


def test_warp_accepts_half_precision_and_extreme_temperature() -> None:
    logits = random_logits(2, V, seed=5)
    probs = warp(logits.to(torch.bfloat16), SamplingParams(temperature=0.9, top_k=3))
    assert probs.dtype == torch.float32 and ((probs > 0).sum(-1) == 3).all()
    tiny = warp(logits, SamplingParams(temperature=1e-30))
    assert torch.isfinite(tiny).all()
    assert torch.equal(tiny.argmax(-1), logits.argmax(-1))


def test_sample_draws_one_token_per_row_within_support() -> None:
    probs = warp(random_logits(1000, V, seed=6), SamplingParams(top_k=2))
    tokens = sample(probs, gen(0))
    assert tokens.shape == (1000,) and tokens.dtype == torch.int64
    assert (probs.gather(-1, tokens.unsqueeze(-1)) > 0).all()
    assert torch.equal(tokens, sample(probs, gen(0)))


