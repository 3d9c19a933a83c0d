"""The orchestrator's rule for a round: its drafts and rows in, its tokens out, with the request's seed.

Why it exists apart from the loop: it is the one thing the statistical tests through the stack swap out
(their negative control, via ``orchestrator.server.build_server``). The rule itself, every draw keyed by
the seed and the position it decides, is `specdec.round_draws` (the Triton target applies the same one
when it decodes target-only tokens on its own).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from orchestrator.generation import GenerationRequest
from specdec.round_draws import draw_round
from specdec.rows import PackedRows
from specdec.sampling import RejectionResult

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
    """`specdec.round_draws.draw_round` with the request's seed and settings; ``first`` is the position of
    the round's first new token."""
    return draw_round(
        drafts, q, p, seed=request.seed, greedy=request.params.greedy, reproducible=request.reproducible, first=first
    )
