"""Hybrid drafting: a model-free drafter when it has a confident match, the draft model otherwise.

Why it exists: model-free drafters cost nothing but only know what the context (or recent traffic)
repeats; a draft model guesses everywhere but costs a forward per token. The hybrid asks the model-free
drafter first and calls the model only when it proposes nothing, so repetitive stretches go free and the
rest still gets drafts. The model's KV cache catches up on the context it skipped when it is next used.
"""

from __future__ import annotations

from draft_service.drafters.base import Drafter, DraftRequest, DraftSequence
from specdec.proposal import Proposal

NAME = "hybrid"


class HybridDrafter:
    """``lookup`` first; ``model`` when the lookup proposes nothing."""

    name = NAME

    def __init__(self, lookup: Drafter, model: Drafter) -> None:
        self.lookup, self.model = lookup, model

    def propose(self, request: DraftRequest) -> Proposal:
        proposal = self.lookup.propose(request)
        return proposal if proposal.token_ids else self.model.propose(request)

    def finish(self, sequence: DraftSequence) -> None:
        """The parts are finished by the service itself (each is also offered on its own)."""
