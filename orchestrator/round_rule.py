"""The rule that turns a round's drafts and rows into its tokens: the coupled mode or modified rejection sampling.

Why it exists apart from the loop: it is the one place where a round's randomness is drawn (every draw
keyed by the seed and the position it decides, `specdec.noise`), and the one thing the statistical tests
through the stack swap out (their negative control, via ``orchestrator.server.build_server``). The math
itself lives in `specdec.sampling`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from orchestrator.generation import GenerationRequest
from specdec import noise
from specdec.rows import PackedRows
from specdec.sampling import RejectionResult, coupled_sample_on_support, rejection_sample_on_support

SampleRound = Callable[
    [list[int], "torch.Tensor | PackedRows | None", "torch.Tensor | PackedRows", GenerationRequest, int], RejectionResult
]


def sample_round(
    drafts: list[int],
    q: torch.Tensor | PackedRows | None,
    p: torch.Tensor | PackedRows,
    request: GenerationRequest,
    first: int,
) -> RejectionResult:
    """The round's tokens from the drafts and the rows: the coupled mode or modified rejection sampling.

    p [k+1, V_p] and q [k, V_q] are warped already (by the target and the draft). Their widths may differ
    (another vocabulary size, or rows unpacked only as wide as their support): a token beyond a row's width
    has probability 0 there, which leaves the sampler exact. ``first`` is the position of the round's first
    new token: every draw comes from (seed, the position it decides) (`specdec.noise`); greedy rows are
    one-hot and need none. (`SpeculativeLoop` takes another rule only in tests: the negative control of
    the statistical tests through the stack.)"""
    seed, k, greedy = request.seed, len(drafts), request.params.greedy
    if request.reproducible:
        def gumbel(i: int, width: int) -> np.ndarray:
            return noise.gumbel(seed, first + i, noise.TOKEN, width)

        return coupled_sample_on_support(drafts, p, None if greedy else gumbel)
    if greedy:  # one-hot rows: any uniform in [0, 1) gives the same tokens
        return rejection_sample_on_support(drafts, q, p, np.zeros(k), np.zeros(k + 1))
    u_accept = noise.uniforms(seed, first, k, noise.ACCEPT)
    u_final = noise.uniforms(seed, first, k + 1, noise.FINAL)
    return rejection_sample_on_support(drafts, q, p, u_accept, u_final)
