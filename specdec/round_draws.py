"""The rule that turns a round's drafts and warped rows into its tokens, every draw keyed by (seed, position).

Why it exists in the ground floor: two processes apply it. The orchestrator applies it to every round it
scores (``orchestrator.round_rule``, which the statistical tests swap for their negative control), and the
Triton target model applies it when it decodes several target-only tokens on its own (``target_service.steps``,
the orchestrator's ``--target-steps``). Both draw each token from the same rows with the same noise of
`specdec.noise` (seed, the position it decides), so a seeded generation comes out token for token the same
whichever side sampled it. The math itself lives in `specdec.sampling`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from specdec import noise
from specdec.rows import PackedRows
from specdec.sampling import RejectionResult, coupled_sample_on_support, rejection_sample_on_support


def draw_round(
    drafts: Sequence[int],
    q: torch.Tensor | PackedRows | None,
    p: torch.Tensor | PackedRows,
    *,
    seed: int,
    greedy: bool,
    reproducible: bool,
    first: int,
) -> RejectionResult:
    """The round's tokens from the drafts and the rows: the coupled mode (``reproducible``) or modified
    rejection sampling.

    p [k+1, V_p] and q [k, V_q] are warped already. Their widths may differ (another vocabulary size, or rows
    unpacked only as wide as their support): a token beyond a row's width has probability 0 there, which
    leaves the sampler exact. ``first`` is the position (index in prompt + output) of the round's first new
    token: every draw comes from (seed, the position it decides); greedy rows are one-hot and need none."""
    drafts, k = list(drafts), len(drafts)
    if reproducible:
        def gumbel(i: int, width: int) -> np.ndarray:
            return noise.gumbel(seed, first + i, noise.TOKEN, width)

        return coupled_sample_on_support(drafts, p, None if greedy else gumbel)
    if greedy:  # one-hot rows: any uniform in [0, 1) gives the same tokens
        return rejection_sample_on_support(drafts, q, p, np.zeros(k), np.zeros(k + 1))
    u_accept = noise.uniforms(seed, first, k, noise.ACCEPT)
    u_final = noise.uniforms(seed, first, k + 1, noise.FINAL)
    return rejection_sample_on_support(drafts, q, p, u_accept, u_final)
