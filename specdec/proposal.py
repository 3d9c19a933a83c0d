"""A draft round's answer, the same type on both sides of the draft service's wire.

Why it exists: the draft service produces it (`draft_service.drafters`) and the orchestrator consumes it
(`orchestrator.loop`); one dataclass with one set of field names keeps the two from drifting apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.rows import PackedRows


@dataclass(frozen=True)
class Proposal:
    """The tokens a drafter proposes for one round, and the q rows they were sampled from."""

    token_ids: tuple[int, ...]  # [m] the proposed tokens
    q: torch.Tensor | PackedRows | None  # [m, V] warped draft rows sampled from; None = one-hot at each token
    cache_length: int  # the drafter's cache after the round
