"""The exact sampler: logit warping and modified rejection sampling for speculative decoding.

Why this module exists: speculative sampling is only worth deploying if its output is distributed
*exactly* like sampling from the target model alone. That guarantee lives entirely in a few lines of
math, so the math lives here, in one pure module (torch, numpy and specdec.rows only: no grpc, no triton,
no model code) that the draft service, the Triton target model, the orchestrator and the tests all import.
The draft warps q with `warp` and samples with `sample`; the target warps p with the same `warp`; the
orchestrator calls `rejection_sample_on_support` (or `rejection_sample_batch`).

Notation (used everywhere in specdec):

* **p** = the *target* distribution (the large model we want to sample from),
* **q** = the *draft* distribution (the small model that proposes tokens).

Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling"
(arXiv 2302.01318, Algorithm 2) **swap the letters**: there q is the target and p the draft.
Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding" (arXiv 2211.17192,
Algorithm 1) use our convention (p target, q draft).

One round with draft length K (0-based positions i = 0..K-1):

* **accepted**: draft token x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)), tested as
  ``u_i * q_i(x_i) < p_i(x_i)`` with u_i ~ U[0, 1) so there is never a division (q_i(x_i) = 0 cannot happen
  for a token the draft actually sampled; if it did, the token is accepted iff p_i(x_i) > 0).
* **recovered**: at the first rejection, position n, a token is drawn from
  norm(max(0, p_n - q_n)) and the round stops.
* **bonus**: if all K drafts are accepted, one extra token is drawn from p_K for free.

A round therefore emits ``accepted + 1`` tokens (1..K+1). With K = 0 it is plain target-only
autoregressive sampling (one draw from p_0), the fair baseline.

Greedy decoding needs no special case: `warp` with temperature 0 returns one-hot rows, so a draft token is
accepted iff it equals argmax p_i, the recovered token is argmax p_n, and the bonus is argmax p_K.

Randomness contract (what makes results reproducible and lets tests replay the draws). The reference
`rejection_sample_batch` draws, for each sequence (row), exactly ``K + 1`` float64 uniforms in [0, 1) from
that row's generator, ``torch.rand(K + 1, dtype=torch.float64, generator=g)``: u_0..u_{K-1} for the
acceptance tests and u_K for the final (recovered or bonus) draw, which is made by inverse CDF: the
smallest token t with ``cumsum(w)[t] > u * sum(w)`` for the non-negative weights w of the row (never a
zero-weight token). The production `rejection_sample_on_support` takes its uniforms as arrays instead, one
per draft position and one per possible final position, which the orchestrator derives from (seed,
position) (`specdec.noise`), so a draw never depends on what was drawn before it.

**Coupled mode** (`coupled_sample_on_support`): the target's own sample at each position is the Gumbel-max
``y_i = argmax_t log p_i(t) + G_i(t)`` (an exact draw from p_i), with noise G_i shared with the draft,
which proposes ``argmax_t log q_i(t) + G_i(t)``. A draft token is accepted iff it equals y_i; the first
mismatch emits y_i. The output is then the target-only sample for the same noise, token for token,
whatever the draft proposed or how many tokens: a seed reproduces its text whatever K, drafter or load.
It accepts less than the modified rejection sampling when the draft samples from its own q (the Gumbel
coupling is not the maximal coupling); for a deterministic draft (greedy, a lookup) both accept draft x
with probability p(x).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from specdec.rows import PackedRows, on_common_support, pack_rows
from specdec.sampling_params import SamplingParams

__all__ = [
    "SamplingParams",
    "warp",
    "sample",
    "RejectionResult",
    "rejection_sample",
    "rejection_sample_batch",
    "rejection_sample_on_support",
    "coupled_sample_on_support",
    "sample_by_gumbel",
]


def _mask_top_k(scaled: torch.Tensor, k: int) -> torch.Tensor:
    """scaled [..., V] -> [..., V] with everything but the k largest entries set to -inf.

    Exactly k entries survive, even with ties at the k-th value (the ones torch.topk picks)."""
    keep_idx = torch.topk(scaled, k, dim=-1).indices  # [..., k]
    keep = torch.zeros_like(scaled, dtype=torch.bool).scatter_(-1, keep_idx, True)  # [..., V]
    return scaled.masked_fill(~keep, float("-inf"))


def _mask_top_p(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    """scaled [..., V] -> [..., V] keeping the smallest most-likely set with probability mass >= top_p.

    Token j (in descending-probability order, ties broken by lower index) is kept iff the mass of the
    tokens before it is < top_p, so the most likely token is always kept. Cumulative sums in float64.

    A full sort of a 49k-wide row is slow on a CPU (bench/README.md, "Design measurements"), so the order
    is only established among the top ``m`` candidates (torch.topk), growing ``m`` until the kept set ends
    strictly above the smallest candidate: then every token tied with the last kept one is a candidate and
    the result equals the full sort's exactly."""
    shape = scaled.shape
    probs = torch.softmax(scaled, dim=-1).reshape(-1, shape[-1])  # [R, V]
    vocab_size = probs.shape[-1]
    for m in (256, 4096, vocab_size):
        m = min(m, vocab_size)
        if m == vocab_size:  # a flat distribution: sort it all
            values, index = torch.sort(probs, dim=-1, descending=True, stable=True)  # [R, V] each
        else:
            values, index = torch.topk(probs, m, dim=-1)  # [R, m] each, tie order unspecified
            index, by_index = torch.sort(index, dim=-1)  # [R, m] candidates by token id
            values, order = torch.sort(values.gather(-1, by_index), dim=-1, descending=True, stable=True)
            index = index.gather(-1, order)  # [R, m] by probability, ties by lower token id
        mass_before = torch.cumsum(values, dim=-1, dtype=torch.float64) - values  # [R, m]
        keep_sorted = mass_before < top_p  # [R, m]
        keep_sorted[:, 0] = True
        last_kept = values.gather(-1, keep_sorted.sum(dim=-1, keepdim=True) - 1)  # [R, 1]
        if m == vocab_size or bool((last_kept[:, 0] > values[:, -1]).all()):
            break
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, index, keep_sorted)  # [R, V]
    return scaled.masked_fill(~keep.reshape(shape), float("-inf"))


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., V] (any float dtype, any device) -> probabilities [..., V] float32 on the same device.

    Order (the same as Hugging Face generate's logits processors): temperature, then top-k, then top-p,
    then softmax. Greedy (temperature == 0): one-hot at argmax (first index on ties, torch.argmax
    semantics). top-k keeps the k largest logits (exactly k, ties resolved by torch.topk's indices).
    top-p keeps the smallest set of most likely tokens whose cumulative probability is >= top_p
    (always at least one token), computed on the temperature- and top-k-warped distribution; the kept
    tokens are then renormalised. Vectorised; no Python loop over V. ``params`` were validated against
    the vocabulary where the request entered (`SamplingParams.validate_for_vocab`); a top_k of V or more
    keeps every token.
    """
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    vocab_size = logits.shape[-1]
    x = logits.to(torch.float32)  # [..., V]
    if params.greedy:
        top = torch.argmax(x, dim=-1)  # [...]
        return torch.nn.functional.one_hot(top, vocab_size).to(torch.float32)  # [..., V]
    # Subtracting the row max first (softmax-invariant) keeps logits / T finite for tiny T.
    x = (x - x.amax(dim=-1, keepdim=True)) / params.temperature  # [..., V]
    if 0 < params.top_k < vocab_size:
        x = _mask_top_k(x, params.top_k)
    if params.top_p < 1.0:
        x = _mask_top_p(x, params.top_p)
    return torch.softmax(x, dim=-1)  # [..., V]


def warp_packed(logits: torch.Tensor, params: SamplingParams) -> tuple[np.ndarray, np.ndarray | None]:
    """logits [N, V] -> ``pack_rows(warp(logits, params))``, the rows as they cross the wire. Greedy rows are
    one-hot, so they pack to the value 1 at their argmax: built directly, without the [N, V] one-hot rows
    and the scan for their support (about 0.4 ms of every greedy round on a 49k vocabulary, CPU)."""
    if params.greedy and logits.dim() == 2 and logits.shape[0] > 0 and logits.shape[1] > 1:
        top = torch.argmax(logits.to(torch.float32), dim=-1, keepdim=True)  # [N, 1], warp's tie rule
        return np.ones((logits.shape[0], 1), dtype=np.float32), top.to(torch.int32).cpu().numpy()
    return pack_rows(warp(logits, params))


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """probs [N, V] -> tokens [N] (int64): one draw per row from `generator` (torch.multinomial)."""
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape [N, V], got {tuple(probs.shape)}")
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [N]


@dataclass(frozen=True)
class RejectionResult:
    """Outcome of one speculative round for one sequence."""

    accepted: int  # n, number of draft tokens accepted (0..K)
    tokens: list[int]  # the n accepted drafts, then one recovered (n < K) or bonus (n == K) token; len n+1


def _draw_inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """weights [B, V] float64 >= 0 with a positive sum per row, u [B] in [0, 1) -> tokens [B] int64.

    Returns the smallest t with cumsum(weights)[t] > u * sum(weights): a zero-weight token is never drawn."""
    cdf = torch.cumsum(weights, dim=-1)  # [B, V]
    target = (u * cdf[:, -1]).unsqueeze(-1)  # [B, 1]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # [B]
    # Guard against u * total rounding up to total: clamp to the last positive-weight token.
    vocab_size = weights.shape[-1]
    last_positive = vocab_size - 1 - torch.argmax(torch.flip(weights > 0, dims=[-1]).to(torch.int8), dim=-1)
    return torch.minimum(tokens, last_positive)  # [B]


def _check_batch_shapes(
    draft_tokens: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor, n_generators: int
) -> tuple[int, int, int]:
    """Validate shapes and dtypes of a batched call; returns (B, K, V)."""
    if p.dim() != 3 or not p.is_floating_point():
        raise ValueError(f"p must be a float tensor [B, K+1, V], got {p.dtype} {tuple(p.shape)}")
    batch, k_plus_1, vocab_size = p.shape
    k = k_plus_1 - 1
    if k < 0:
        raise ValueError(f"p must have K+1 >= 1 rows per sequence, got shape {tuple(p.shape)}")
    if draft_tokens.dim() != 2 or tuple(draft_tokens.shape) != (batch, k):
        raise ValueError(f"draft_tokens must have shape [B, K] = [{batch}, {k}], got {tuple(draft_tokens.shape)}")
    if draft_tokens.is_floating_point() or draft_tokens.is_complex() or draft_tokens.dtype == torch.bool:
        raise ValueError(f"draft_tokens must be an integer tensor, got {draft_tokens.dtype}")
    if q is not None and (tuple(q.shape) != (batch, k, vocab_size) or not q.is_floating_point()):
        raise ValueError(f"q must be a float tensor [B, K, V] = [{batch}, {k}, {vocab_size}], got {tuple(q.shape)}")
    if n_generators != batch:
        raise ValueError(f"need one generator per sequence: {batch} sequences, {n_generators} generators")
    if draft_tokens.numel():
        low, high = int(draft_tokens.min()), int(draft_tokens.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"draft_tokens must be in [0, {vocab_size}), got values in [{low}, {high}]")
    return batch, k, vocab_size


def _draw_uniforms(generators: Sequence[torch.Generator], k: int, device: torch.device) -> torch.Tensor:
    """One row of K+1 float64 uniforms per generator -> [B, K+1] (the only per-row Python loop)."""
    if not generators:
        return torch.empty(0, k + 1, dtype=torch.float64, device=device)
    rows = [torch.rand(k + 1, dtype=torch.float64, generator=g, device=device) for g in generators]
    return torch.stack(rows)  # [B, K+1]


def rejection_sample_batch(
    draft_tokens: torch.Tensor,
    q: torch.Tensor | None,
    p: torch.Tensor,
    generators: Sequence[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Modified rejection sampling for B sequences at once, one row each.

    draft_tokens [B, K] int: the tokens the draft sampled.
    q [B, K, V]: the warped draft probabilities the draft actually sampled from, or None, meaning one-hot
        at each draft token (what a greedy/deterministic draft has).
    p [B, K+1, V]: warped target probabilities; row i scores position i given the prefix and x_0..x_{i-1}.
    generators: one per row, on p's device. Each row consumes exactly K+1 float64 uniforms (module doc).

    Returns (accepted [B] int64, tokens [B, K+1] int64): tokens[b, :accepted[b]] are the accepted drafts,
    tokens[b, accepted[b]] the recovered (accepted < K) or bonus (accepted == K) token, then -1 padding.

    If the residual max(0, p_n - q_n) is all zero (only possible through rounding, or when a draft token
    with p_n(x) = q_n(x) = 0 is rejected), the recovered token is drawn from p_n instead.
    Vectorised over B and K except the per-row uniform draws; deterministic given the generators' states.
    """
    batch, k, vocab_size = _check_batch_shapes(draft_tokens, q, p, len(generators))
    device = p.device
    x = draft_tokens.to(device=device, dtype=torch.int64)  # [B, K]
    u = _draw_uniforms(generators, k, device)  # [B, K+1]
    rows = torch.arange(batch, device=device)  # [B]

    # Accept/reject every draft position at once; accepted = length of the leading run of acceptances.
    p_x = torch.gather(p[:, :k, :], -1, x.unsqueeze(-1)).squeeze(-1).to(torch.float64)  # [B, K]
    if q is None:
        q_x = torch.ones_like(p_x)  # [B, K]
    else:
        q_x = torch.gather(q, -1, x.unsqueeze(-1)).squeeze(-1).to(torch.float64)  # [B, K]
    accept = u[:, :k] * q_x < p_x  # [B, K]
    accepted = torch.cumprod(accept.to(torch.int64), dim=-1).sum(dim=-1)  # [B]

    # Final draw from row n = accepted: residual max(0, p_n - q_n), with q_K := 0 so the bonus row is p_K.
    p_n = p[rows, accepted].to(torch.float64)  # [B, V]
    rejected = accepted < k  # [B]
    n_draft = accepted.clamp(max=max(k - 1, 0))  # [B] a valid draft index (unused where not rejected)
    if k == 0:
        q_n = torch.zeros_like(p_n)  # [B, V]
    elif q is None:
        x_n = x[rows, n_draft]  # [B]
        q_n = torch.zeros_like(p_n).scatter_(-1, x_n.unsqueeze(-1), rejected.to(torch.float64).unsqueeze(-1))
    else:
        q_n = q[rows, n_draft].to(torch.float64) * rejected.to(torch.float64).unsqueeze(-1)  # [B, V]
    residual = torch.clamp(p_n - q_n, min=0.0)  # [B, V]
    degenerate = residual.sum(dim=-1) <= 0  # [B]
    weights = torch.where(degenerate.unsqueeze(-1), p_n, residual)  # [B, V]
    final = _draw_inverse_cdf(weights, u[:, k])  # [B]  recovered or bonus

    positions = torch.arange(k + 1, device=device).unsqueeze(0)  # [1, K+1]
    x_padded = torch.cat([x, torch.full((batch, 1), -1, dtype=torch.int64, device=device)], dim=-1)  # [B, K+1]
    tokens = torch.where(positions < accepted.unsqueeze(-1), x_padded, torch.full_like(x_padded, -1))  # [B, K+1]
    tokens[rows, accepted] = final
    return accepted, tokens


def rejection_sample(
    draft_tokens: torch.Tensor,
    q: torch.Tensor | None,
    p: torch.Tensor,
    generator: torch.Generator,
) -> RejectionResult:
    """Modified rejection sampling for one sequence: a thin wrapper over `rejection_sample_batch`.

    draft_tokens [K] int, q [K, V] warped draft probabilities the draft actually sampled from (None means
    one-hot at each draft token), p [K+1, V] warped target probabilities. K may be 0 (then this is a
    single draw from p[0]: target-only autoregressive sampling). Same results as the batched call for
    the same generator state.
    """
    if draft_tokens.dim() != 1:
        raise ValueError(f"draft_tokens must have shape [K], got {tuple(draft_tokens.shape)}")
    if p.dim() != 2:
        raise ValueError(f"p must have shape [K+1, V], got {tuple(p.shape)}")
    if q is not None and q.dim() != 2:
        raise ValueError(f"q must have shape [K, V], got {tuple(q.shape)}")
    accepted, tokens = rejection_sample_batch(
        draft_tokens.unsqueeze(0), None if q is None else q.unsqueeze(0), p.unsqueeze(0), [generator]
    )
    n = int(accepted[0])
    return RejectionResult(accepted=n, tokens=tokens[0, : n + 1].tolist())


def rejection_sample_on_support(
    draft_tokens: Sequence[int],
    q: torch.Tensor | PackedRows | None,
    p: torch.Tensor | PackedRows,
    u_accept: np.ndarray,
    u_final: np.ndarray,
) -> RejectionResult:
    """`rejection_sample` computed over the union of the rows' supports instead of the whole vocabulary.

    q [K, V_q] and p [K+1, V_p] as for `rejection_sample`, but they may be kept packed
    (`specdec.rows.PackedRows`, as they come off the wire) and may differ in width (a token beyond a row's
    width has probability 0 there). ``u_accept`` [K] are the acceptance uniforms of the draft positions,
    ``u_final`` [K+1] the uniform of the final draw at each position it may land on (n = the drafts
    accepted picks ``u_final[n]``). With u_accept = u[:K] and every u_final = u[K] it is `rejection_sample`
    token for token for the generator that drew u: a column where every row of p and q is 0 changes
    neither an acceptance test nor the inverse-CDF draw (its cumulative weight equals its left
    neighbour's, so it is never the first to exceed the target) and the kept columns stay in token order.
    Warped rows under greedy, top-k or top-p have a support of 1 to a few hundred tokens, so the float64
    work shrinks from V (49,152 for SmolLM2) to that, and no V-wide row is ever built.

    This is the orchestrator's per-round hot path, so it is the same arithmetic as `rejection_sample_batch`
    (same float64 operations in the same order) written in numpy for one sequence: on rows this small,
    each torch call costs ten times a numpy one. The tests hold it to the torch sampler token for token.
    """
    x, p_rows, q_rows = _check_round(draft_tokens, p, q)
    k = x.size
    if np.shape(u_accept) != (k,) or np.shape(u_final) != (k + 1,):
        raise ValueError(f"need {k} acceptance and {k + 1} final uniforms, got {np.shape(u_accept)}, {np.shape(u_final)}")
    columns, restricted = on_common_support([p_rows] + ([] if q_rows is None else [q_rows]), x)  # [S]
    p_s, q_s = restricted[0], (None if q_rows is None else restricted[1])  # [K+1, S], [K, S] float64
    x_col = np.searchsorted(columns, x)  # [K] the drafts' columns

    positions = np.arange(k)
    p_x = p_s[positions, x_col]  # [K]
    q_x = np.ones(k) if q_s is None else q_s[positions, x_col]  # [K]
    rejections = np.flatnonzero(~(np.asarray(u_accept) * q_x < p_x))
    n = int(rejections[0]) if rejections.size else k  # drafts accepted

    p_n = p_s[n]  # [S]
    if n == k:  # all accepted: the bonus row, q_K := 0
        residual = p_n
    else:  # the first rejection: max(0, p_n - q_n), q_n one-hot at the draft when q is None
        q_n = q_s[n] if q_s is not None else np.where(np.arange(columns.size) == x_col[n], 1.0, 0.0)
        residual = np.maximum(p_n - q_n, 0.0)
    weights = p_n if residual.sum() <= 0 else residual  # degenerate residual: draw from p_n
    cdf = np.cumsum(weights)
    final = int(np.searchsorted(cdf, u_final[n] * cdf[-1], side="right"))
    positive = np.flatnonzero(weights > 0)
    final = min(final, int(positive[-1]) if positive.size else weights.size - 1)  # u * total rounding up
    tokens = [*x[:n].tolist(), int(columns[final])]
    return RejectionResult(accepted=n, tokens=tokens)


def coupled_sample_on_support(
    draft_tokens: Sequence[int],
    p: torch.Tensor | PackedRows,
    gumbel: Callable[[int, int], np.ndarray] | None,
) -> RejectionResult:
    """The coupled mode (module docstring): y_i = argmax_t log p_i(t) + G_i(t); accept while draft i == y_i.

    p [K+1, V_p] warped target rows (packed or dense); ``gumbel(i, width)`` gives row i's noise for token ids
    0..width-1 (only the rows up to the first mismatch are asked for). None means no noise: every row of p is
    one-hot (greedy), and y_i is its token."""
    x, p_rows, _ = _check_round(draft_tokens, p, None)
    values = p_rows.values
    for i in range(x.size + 1):
        ids = np.arange(p_rows.width) if p_rows.index is None else p_rows.index[i]  # [M] token ids of row i
        with np.errstate(divide="ignore"):
            scores = np.log(values[i].astype(np.float64))  # [M]; zero entries (padding) can never win
        if gumbel is not None:
            scores = scores + gumbel(i, int(ids.max()) + 1)[ids]
        y = int(ids[int(np.argmax(scores))])
        if i == x.size or int(x[i]) != y:
            return RejectionResult(accepted=i, tokens=[*x[:i].tolist(), y])
    raise AssertionError("unreachable: the last row always ends the round")


def _check_round(
    draft_tokens: Sequence[int], p: torch.Tensor | PackedRows, q: torch.Tensor | PackedRows | None
) -> tuple[np.ndarray, PackedRows, PackedRows | None]:
    p_rows = p if isinstance(p, PackedRows) else PackedRows.of_dense(p)
    q_rows = q if q is None or isinstance(q, PackedRows) else PackedRows.of_dense(q)
    x = np.asarray(draft_tokens, dtype=np.int64)  # [K]
    k = x.size
    if k and int(x.min()) < 0:
        raise ValueError(f"draft_tokens must be >= 0, got {x.tolist()}")
    if p_rows.shape[0] != k + 1:
        raise ValueError(f"p must have K+1 = {k + 1} rows, got {p_rows.shape[0]}")
    if q_rows is not None and q_rows.shape[0] != k:
        raise ValueError(f"q must have K = {k} rows, got {q_rows.shape[0]}")
    return x, p_rows, q_rows


def sample_by_gumbel(probs: torch.Tensor, noise: np.ndarray) -> int:
    """probs [V] (warped) and noise [>= V] Gumbel -> argmax_t log probs(t) + noise(t): an exact draw from
    probs (the Gumbel-max trick), determined by the noise (the draft's side of the coupled mode)."""
    scores = torch.log(probs.double()) + torch.from_numpy(noise[: probs.shape[-1]])
    return int(torch.argmax(scores))
