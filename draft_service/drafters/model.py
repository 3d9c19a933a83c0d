"""The model drafter: K tokens sampled autoregressively from a small causal LM's warped q.

Why it exists: where the context does not repeat itself, only a model can guess the target's next tokens.
One round, for a sequence whose context the service keeps (`DraftSequence`):

1. bring the model's KV cache up to the context: keep the longest prefix the cache and the context share
   (the cache also holds the drafts it fed last round: the ones the target accepted are reused, never
   recomputed), feed the rest, take the logits of the last position;
2. K times: ``q_i = warp(logits, sampling)``, ``x_i ~ q_i`` by Gumbel-max with the noise of its position
   (`specdec.noise`: the draft's own, or in the coupled mode the noise the target's sample uses there);
   feed x_i for the next logits, except the last one (sampled, never fed).

The forwards run on the service's `StepLoop`, batched with every other stream's. Greedy proposals carry no
q rows (q is one-hot), nor do coupled ones (the orchestrator compares tokens); the others carry the K rows
they were sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from draft_service.drafters.base import DraftRequest, DraftSequence
from draft_service.drafters.steps import Job, StepLoop
from specdec import noise
from specdec.engine import StepItem
from specdec.kv_cache import KVCache
from specdec.proposal import Proposal
from specdec.sampling import sample_by_gumbel, warp

NAME = "model"


@dataclass
class _State:
    cache: KVCache
    fed: list[int] = field(default_factory=list)  # the tokens in the cache: a prefix of the context + drafts


def _logits(result: torch.Tensor | BaseException) -> torch.Tensor:
    if isinstance(result, BaseException):
        raise result
    return result  # [1, V]


class ModelDrafter:
    """Drafts with a causal LM through a `StepLoop` (its steps batched with other streams')."""

    name = NAME

    def __init__(self, loop: StepLoop) -> None:
        self.loop = loop
        self.engine = loop.engine

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    @property
    def max_length(self) -> int:
        return self.engine.max_length

    def propose(self, request: DraftRequest) -> Proposal:
        sequence = request.sequence
        state = sequence.states.get(self.name)
        if state is None:
            state = sequence.states[self.name] = _State(self.engine.new_cache())
        return self.loop.run(self._draft(state, request), request.waiting)

    def finish(self, sequence: DraftSequence) -> None:
        sequence.states.pop(self.name, None)

    def _draft(self, state: _State, request: DraftRequest) -> Job[Proposal]:
        context, k, params = request.sequence.tokens, request.num_draft_tokens, request.params
        shared = min(request.sequence.unchanged, len(state.fed), state.cache.length)
        while shared < min(len(state.fed), len(context)) and state.fed[shared] == context[shared]:
            shared += 1
        shared = min(shared, len(context) - 1)  # always feed at least the last token, for its logits
        purpose = noise.TOKEN if request.coupled else noise.DRAFT
        try:
            logits = _logits((yield StepItem(state.cache, shared, context[shared:], 1)))
            state.fed[shared:] = context[shared:]
            tokens: list[int] = []
            rows: list[torch.Tensor] = []  # K x [1, V]
            for i in range(k):
                q = warp(logits, params)  # [1, V]
                if params.greedy:
                    token = int(torch.argmax(q[0]))
                else:
                    position = len(context) + i
                    token = sample_by_gumbel(q[0], noise.gumbel(request.seed, position, purpose, q.shape[-1]))
                tokens.append(token)
                rows.append(q)
                if i < k - 1:
                    logits = _logits((yield StepItem(state.cache, len(state.fed), [token], 1)))
                    state.fed.append(token)
        finally:
            del state.fed[state.cache.length :]  # a failed step leaves the cache shorter: stay in step with it
        q_rows = None if params.greedy or request.coupled else torch.cat(rows)  # [K, V]
        return Proposal(tuple(tokens), q_rows, len(context))
