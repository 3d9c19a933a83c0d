"""Prompt lookup: propose what followed the most recent earlier occurrence of the context's last n tokens.

Why it exists: a drafter that costs nothing. When the output repeats its own context (code edits, quoting
the prompt, summaries, RAG), the tokens after an earlier occurrence of the last few tokens are often the
next ones (Saxena's prompt lookup decoding; Hugging Face's ``prompt_lookup_num_tokens``, vLLM's n-gram
proposer). n runs from ``max_n`` down to ``min_n``: the longest match wins. Its proposals are
deterministic, so q is one-hot and the rejection step keeps the output exact under any sampling settings.

Per sequence it keeps, for every n-gram of the context, where it last ended and where it ended before that
(an index updated as the context grows: O(max_n) per token), so a lookup is O(max_n) dictionary probes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from draft_service.drafters.base import DraftRequest, DraftSequence
from specdec.proposal import Proposal

NAME = "ngram"


@dataclass
class _Index:
    last: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> the position it last ended at
    before: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> where it ended before that
    indexed: int = 0  # tokens of the context already in the index


class NgramDrafter:
    """Prompt lookup over the sequence's own context (prompt and generated tokens)."""

    name = NAME

    def __init__(self, min_n: int = 1, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= ngram min <= ngram max, got {min_n} and {max_n}")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, request: DraftRequest) -> Proposal:
        tokens = request.sequence.tokens
        index = self._index(request.sequence)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            end = index.before.get(tuple(tokens[-n:]))
            if end is not None:
                follow = tokens[end + 1 : end + 1 + request.num_draft_tokens]
                return Proposal(tuple(follow), None, len(tokens))
        return Proposal((), None, len(tokens))

    def finish(self, sequence: DraftSequence) -> None:
        sequence.states.pop(self.name, None)

    def _index(self, sequence: DraftSequence) -> _Index:
        """The sequence's index, brought up to date with its context (rebuilt after a roll-back)."""
        index = sequence.states.get(self.name)
        if index is None or index.indexed > sequence.unchanged:
            index = sequence.states[self.name] = _Index()
        tokens = sequence.tokens
        for end in range(index.indexed, len(tokens)):
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                key = tuple(tokens[end - n + 1 : end + 1])
                previous = index.last.get(key)
                if previous is not None:
                    index.before[key] = previous
                index.last[key] = end
        index.indexed = len(tokens)
        return index
