"""`specdec.speedup`: Leviathan et al.'s expected tokens per round, the ideal speedup, and α."""

from __future__ import annotations

import math

import pytest
import torch

from specdec.speedup import acceptance_rate_alpha, expected_tokens_per_round, ideal_speedup
from tests.fakes import random_probs

pytestmark = pytest.mark.usefixtures("single_torch_thread")

V = 16


# ---------------------------------------------------------------------------------------------- speedup


def test_expected_tokens_per_round_known_values() -> None:
    alpha, k = 0.8, 4
    by_hand = 1 + alpha + alpha**2 + alpha**3 + alpha**4  # sum of P(at least i drafts accepted)
    assert expected_tokens_per_round(alpha, k) == pytest.approx(by_hand)
    assert expected_tokens_per_round(alpha, k) == pytest.approx((1 - 0.8**5) / 0.2)
    assert expected_tokens_per_round(1.0, 4) == 5.0
    assert expected_tokens_per_round(0.0, 7) == 1.0
    assert expected_tokens_per_round(0.5, 0) == 1.0
    assert expected_tokens_per_round(1 - 1e-12, 3) == pytest.approx(4.0, rel=1e-6)


def test_ideal_speedup_known_values() -> None:
    alpha, k, c = 0.8, 4, 0.05
    by_hand = (1 - alpha ** (k + 1)) / (1 - alpha) / (k * c + 1)
    assert ideal_speedup(alpha, k, c) == pytest.approx(by_hand)
    assert ideal_speedup(alpha, k, c, verify_cost_ratio=1.6) == pytest.approx(by_hand * 1.2 / (0.2 + 1.6))
    assert ideal_speedup(1.0, 3, 0.0) == 4.0
    assert ideal_speedup(0.3, 0, 0.5) == 1.0  # k = 0: target only, no speedup


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: expected_tokens_per_round(1.1, 3), "alpha must be a number in"),
        (lambda: expected_tokens_per_round(-0.1, 3), "alpha must be a number in"),
        (lambda: expected_tokens_per_round(math.nan, 3), "alpha must be a number in"),
        (lambda: expected_tokens_per_round(0.5, -1), "k must be an integer >= 0"),
        (lambda: expected_tokens_per_round(0.5, 2.0), "k must be an integer >= 0"),
        (lambda: ideal_speedup(0.5, 3, -0.1), "draft_cost_ratio must be a finite number >= 0"),
        (lambda: ideal_speedup(0.5, 3, math.inf), "draft_cost_ratio must be a finite number >= 0"),
        (lambda: ideal_speedup(0.5, 3, 0.1, 0.0), "verify_cost_ratio must be a finite number > 0"),
        (lambda: acceptance_rate_alpha(torch.zeros(3), torch.zeros(4)), "same shape"),
    ],
)
def test_speedup_helpers_reject_invalid_arguments(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_acceptance_rate_alpha() -> None:
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.5, 0.0, 0.5], [0.2, 0.3, 0.5]])
    torch.testing.assert_close(acceptance_rate_alpha(p, q), torch.tensor([0.5, 1.0], dtype=torch.float64))
    a = random_probs(10, V, seed=29)
    b = random_probs(10, V, seed=30)
    tv = 0.5 * (a.double() - b.double()).abs().sum(-1)
    torch.testing.assert_close(acceptance_rate_alpha(a, b), 1 - tv)


