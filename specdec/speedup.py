"""What speculative sampling should buy, in theory: the helpers benchmarks compare measurements against.

Why this module exists: a benchmark number means little without the number theory predicts for the same
acceptance rate, draft length and costs. These are the formulas of Leviathan et al. 2023, "Fast Inference
from Transformers via Speculative Decoding" (arXiv 2211.17192, §3: acceptance rate, number of generated tokens, walltime improvement), in our notation
(p = target distribution, q = draft distribution; Chen et al. 2023 swap the letters), with the draft
length called k (Leviathan's gamma, Chen's K). Pure Python plus torch; no service code.
"""

from __future__ import annotations

import math

import torch

__all__ = ["expected_tokens_per_round", "ideal_speedup", "acceptance_rate_alpha"]


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or math.isnan(alpha) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")


def _check_ratio(name: str, value: float, *, allow_zero: bool) -> None:
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok_type or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def expected_tokens_per_round(alpha: float, k: int) -> float:
    """Expected tokens emitted per round (accepted drafts + 1), Leviathan et al. 2023, §3:

        E[tokens] = (1 - alpha**(k+1)) / (1 - alpha),   and k + 1 when alpha == 1,

    assuming each draft token is accepted independently with probability alpha. k = 0 gives 1 (target only).
    """
    _check_alpha(alpha)
    _check_k(k)
    if alpha == 1:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def ideal_speedup(alpha: float, k: int, draft_cost_ratio: float, verify_cost_ratio: float = 1.0) -> float:
    """Expected walltime speedup over target-only sampling, Leviathan et al. 2023, §3 (walltime improvement):

        speedup = E[tokens] / (k * c + v),   E[tokens] = (1 - alpha**(k+1)) / (1 - alpha),

    c = draft_cost_ratio = draft step time / target step time (>= 0);
    v = verify_cost_ratio = target time to score k+1 tokens at once / target time for 1 token (> 0).
    v = 1 is the paper's assumption (a GPU scores k+1 tokens for the price of one); on a CPU it is
    measurably > 1 and must be measured, not assumed. Target-only costs 1 per token, hence the ratio.
    """
    _check_ratio("draft_cost_ratio", draft_cost_ratio, allow_zero=True)
    _check_ratio("verify_cost_ratio", verify_cost_ratio, allow_zero=False)
    return expected_tokens_per_round(alpha, k) / (k * draft_cost_ratio + verify_cost_ratio)


def acceptance_rate_alpha(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p [..., V], q [..., V] -> [...]: the probability a draft token x ~ q is accepted by the target p,

        beta = sum_x min(p(x), q(x)) = 1 - TV(p, q)        (Leviathan et al. 2023, §3: beta = 1 - D_LK(p, q)).

    Leviathan's alpha is the expectation of beta over positions: average this over rows. Computed in float64.
    """
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape [..., V], got {tuple(p.shape)} and {tuple(q.shape)}")
    if p.dim() < 1 or p.shape[-1] < 1:
        raise ValueError(f"p and q must have shape [..., V] with V >= 1, got {tuple(p.shape)}")
    return torch.minimum(p.to(torch.float64), q.to(torch.float64)).sum(dim=-1)
