"""Naive, obviously-correct reference for `specdec.sampling`: the test oracle.

Why this file exists: the production sampler is vectorised (gathers, cumprods, scatters, searchsorted),
which is where off-by-one and masking bugs hide. This module restates the same math the slow way —
plain Python loops over tokens and positions, float64 arithmetic, one step at a time exactly as written
in Chen et al. 2023, Algorithm 2 (which names the target q and the draft p; here, as in all of specdec,
p = target and q = draft) — so unit tests can cross-check the fast code against it.

Conventions shared with the production sampler (documented in `specdec.sampling`):
* warp order: temperature, top-k, top-p, softmax; greedy = one-hot at the first argmax;
* a round consumes K+1 uniforms: u[0..K-1] for acceptance (accept iff u_i * q_i(x_i) < p_i(x_i)), u[K]
  for the final draw, made by inverse CDF (smallest t with cumsum(w)[t] > u[K] * sum(w)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Row = list[float]


def warp_row(logits: Sequence[float], temperature: float, top_k: int, top_p: float) -> Row:
    """One row of logits -> probabilities, token by token (float64)."""
    v = len(logits)
    if temperature == 0:
        best = 0
        for t in range(v):
            if logits[t] > logits[best]:
                best = t
        return [1.0 if t == best else 0.0 for t in range(v)]
    scaled = [float(x) / temperature for x in logits]
    kept = set(range(v))
    if 0 < top_k < v:
        by_value = sorted(range(v), key=lambda t: (-scaled[t], t))
        kept = set(by_value[:top_k])
    if top_p < 1.0:
        probs = _softmax_over(scaled, kept)
        by_prob = sorted(kept, key=lambda t: (-probs[t], t))
        nucleus: set[int] = set()
        mass = 0.0
        for t in by_prob:
            nucleus.add(t)
            mass += probs[t]
            if mass >= top_p:
                break
        kept = nucleus
    return _softmax_over(scaled, kept)


def _softmax_over(scaled: Sequence[float], kept: set[int]) -> Row:
    """Softmax of `scaled` restricted to the tokens in `kept` (others get probability 0)."""
    top = max(scaled[t] for t in kept)
    weights = [math.exp(scaled[t] - top) if t in kept else 0.0 for t in range(len(scaled))]
    total = sum(weights)
    return [w / total for w in weights]


def draw_inverse_cdf(weights: Sequence[float], u: float) -> int:
    """Smallest t with cumsum(weights)[t] > u * sum(weights)."""
    threshold = u * sum(weights)
    running = 0.0
    last_positive = 0
    for t, w in enumerate(weights):
        running += w
        if w > 0:
            last_positive = t
            if running > threshold:
                return t
    return last_positive


def rejection_sample(
    draft_tokens: Sequence[int], q: Sequence[Row] | None, p: Sequence[Row], uniforms: Sequence[float]
) -> tuple[int, list[int]]:
    """The sequential algorithm: returns (accepted, emitted tokens). q None means one-hot at the drafts."""
    k = len(draft_tokens)
    assert len(p) == k + 1 and len(uniforms) == k + 1
    v = len(p[0])
    q_rows = q if q is not None else [[1.0 if t == x else 0.0 for t in range(v)] for x in draft_tokens]
    emitted: list[int] = []
    for i in range(k):
        x = draft_tokens[i]
        if uniforms[i] * q_rows[i][x] < p[i][x]:  # accept with probability min(1, p/q)
            emitted.append(x)
            continue
        residual = [max(0.0, p[i][t] - q_rows[i][t]) for t in range(v)]
        if sum(residual) <= 0:
            residual = list(p[i])
        emitted.append(draw_inverse_cdf(residual, uniforms[k]))
        return i, emitted
    emitted.append(draw_inverse_cdf(p[k], uniforms[k]))  # bonus
    return k, emitted


def first_token_distribution(q0: Row, p0: Row) -> Row:
    """Exact probability of each first emitted token when the draft samples x ~ q0 (K >= 1).

    P(t) = q0(t) * min(1, p0(t)/q0(t)) + P(reject) * residual(t) / sum(residual), which algebra says is
    p0(t): the theorem the whole method rests on (with K = 0 the first token is drawn from p0 directly)."""
    v = len(p0)
    accept_mass = [min(q0[t], p0[t]) for t in range(v)]
    reject_prob = 1.0 - sum(accept_mass)
    residual = [max(0.0, p0[t] - q0[t]) for t in range(v)]
    total = sum(residual)
    if total <= 0:
        return accept_mass
    return [accept_mass[t] + reject_prob * residual[t] / total for t in range(v)]
