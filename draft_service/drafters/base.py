"""What every drafter sees and answers: one sequence's context, a budget of K tokens, a proposal of 0..K.

Why it exists: the draft service offers several drafters (a model, prompt lookup, a suffix index, and a
hybrid of them) behind one interface, so the service's round bookkeeping, its wire format and the
orchestrator do not care which one answered. A drafter keeps whatever it needs per sequence in
``DraftSequence.states[name]`` and sees the context grow round by round.

The context is the sequence's tokens as the orchestrator knows them: the prompt plus every emitted token.
Drafts are never part of it: each round appends what the target decided (accepted drafts plus the new
token), so a drafter's cache length is always the context's length (docs/architecture.md, "One round").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from specdec.proposal import Proposal
from specdec.sampling_params import SamplingParams


@dataclass
class DraftSequence:
    """One sequence's state in the draft service."""

    tokens: list[int] = field(default_factory=list)  # the context: prompt + emitted tokens
    prompt_length: int = 0  # tokens of the first round's append (the prompt)
    unchanged: int = 0  # tokens at the start of the context that the last round did not touch (its keep_length)
    states: dict[str, Any] = field(default_factory=dict)  # drafter name -> its per-sequence state

    def apply(self, keep_length: int, append: list[int]) -> None:
        """The round's rollback and append; ValueError if keep_length exceeds the context."""
        if keep_length > len(self.tokens):
            raise ValueError(f"keep_length {keep_length} exceeds the cached length {len(self.tokens)}")
        if keep_length == 0:
            self.prompt_length = len(append)
        del self.tokens[keep_length:]
        self.tokens.extend(append)
        self.unchanged = keep_length


@dataclass(frozen=True)
class DraftRequest:
    """What a drafter is asked for one round of one sequence."""

    sequence: DraftSequence
    num_draft_tokens: int  # K: the most tokens to propose
    params: SamplingParams
    seed: int  # the generation's: the noise of the token at context position j derives from (seed, j)
    coupled: bool = False  # sample with the target's noise (specdec.noise.TOKEN), send no q rows
    waiting: Callable[[], bool] = lambda: True  # whether its caller still waits (False: the RPC has ended)


class Drafter(Protocol):
    """Proposes up to K tokens; a deterministic proposal has q = None (one-hot at each token)."""

    name: str

    def propose(self, request: DraftRequest) -> Proposal:
        """The round's proposal (``cache_length`` = the context's length). Called from many threads, one
        per open stream; each sequence is in one call at a time."""
        ...

    def finish(self, sequence: DraftSequence) -> None:
        """The sequence ended (released or evicted): drop its state, learn from its tokens if useful."""
        ...
