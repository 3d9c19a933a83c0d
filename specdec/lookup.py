"""Prompt lookup next to the target: drafts from the sequence's own tokens, for a decode's next forward.

Why it exists: a model-free drafter costs nothing to run, but in the draft service each of its rounds still
pays two hops (orchestrator to draft, orchestrator to Triton). When the target decodes target-only tokens on
its own (DECODE_STEPS), it holds the sequence's tokens already, so it can look up a draft itself and verify
it in the same forward that samples the next token: speculation with no hop and no round of its own, as
Hugging Face's ``prompt_lookup_num_tokens`` runs next to the model. The drafts are deterministic (q one-hot),
so `specdec.round_draws` keeps the tokens exact under any sampling settings.

The rule is the suffix drafter's on the sequence's own tokens (draft_service/drafters/suffix.py): find the
earlier occurrence of the context's end with the longest match (up to ``max_match`` tokens; the most recent
among equals) and propose what followed it, ``per_match`` tokens per matched token, at most ``max_tokens``.
A one-token match earns a short draft, a long one a long draft: on open text most one-token matches are
wrong, and each drafted token costs the forward a row (bench/README.md, "Design measurements").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MAX_MATCH = 8  # longest match looked for, in tokens
PER_MATCH = 4  # drafted tokens per matched token
RETRY_EVERY = 8  # forwards without drafts, for a sequence whose drafts do not pay, before it tries one token
RETRY_BUDGET = 0.01  # and at least as many that those one-token tries add at most this share to a forward
MAX_ALLOWANCE = 1 << 30
ROW_COST = 0.05  # a forward's cost per extra row over its cost alone, by default (SmolLM2 on this CPU: 1 ms / 19 ms)


class Acceptance:
    """One sequence's record of its looked-up drafts: whether they pay in a forward of ``n`` sequences.

    A drafted token costs its forward a row, which every sequence in the forward waits for: with a forward
    costing ``a + b·rows``, a token costs the batch (a + b·n) / n and a row b, so a row pays when its chance
    of being accepted exceeds r·n / (1 + r·n), r = b / a (``row_cost``; this CPU's SmolLM2 ~0.05: 5 % alone,
    30 % in a forward of 8, 44 % of 16; a GPU's rows are nearly free). The rate starts at a quarter (drafts
    alone and among 4, not among 8), and a sequence whose drafts do not pay tries a one-token draft now and
    then, so it notices when its text starts repeating: every ``RETRY_EVERY`` forwards, and rarer in a big
    forward, where each try's row costs all n sequences, so that the tries of all of them add at most
    ``RETRY_BUDGET`` to its cost: every r·n / (RETRY_BUDGET·(1 + r·n)) forwards (8 alone, 29 among 8, 45
    among 16 at r = 0.05; one try every 8 forwards had cost 5–13 % of the tokens/s among 16 on open text).
    In a forward of several, a draft is also at most one token longer than twice the sequence's last
    accepted run: a lucky try does not bring back drafts of 16 rows at once, and text that keeps repeating
    doubles its drafts forward after forward (1, 3, 7, 15). Alone, rows are nearly free and drafts are as
    long as the match allows. Deterministic, from past forwards only: exactness does not depend on it."""

    def __init__(self) -> None:
        self.drafted, self.accepted, self.skipped = 4.0, 1.0, 0
        self.last = 0  # drafts accepted in the last forward that carried some

    def rate(self) -> float:
        return self.accepted / self.drafted

    def allowance(self, sequences: int, row_cost: float) -> int:
        """How many draft tokens this forward (of ``sequences``) may carry for this sequence: while its drafts
        pay, any number alone and up to 2 · its last accepted run + 1 among others; one now and then while
        they do not (a cheap test, paced by the row's cost); else none."""
        load = row_cost * max(1, sequences)
        if self.rate() >= load / (1 + load):
            self.skipped = 0
            return MAX_ALLOWANCE if sequences <= 1 or load <= 0 else 2 * self.last + 1
        if self.skipped >= max(RETRY_EVERY, math.ceil(load / (RETRY_BUDGET * (1 + load)))):
            self.skipped = 0
            return 1
        self.skipped += 1
        return 0

    def add(self, drafted: int, accepted: int, decay: float = 0.9) -> None:
        self.drafted = decay * self.drafted + drafted
        self.accepted = decay * self.accepted + accepted
        self.last = accepted


def propose(
    context: Sequence[int] | np.ndarray, max_tokens: int, *, max_match: int = MAX_MATCH, per_match: int = PER_MATCH
) -> tuple[int, ...]:
    """Up to ``max_tokens`` draft tokens to follow ``context`` (prompt and tokens so far), or () without a match."""
    tokens = np.asarray(context, dtype=np.int64)
    if max_tokens < 1 or tokens.size < 2:
        return ()
    last = tokens.size - 1
    ends = np.flatnonzero(tokens[:last] == tokens[last])  # earlier occurrences of the last token
    if ends.size == 0:
        return ()
    matched = np.ones(ends.size, dtype=np.int64)  # how many tokens each occurrence matches, backwards
    alive = np.ones(ends.size, dtype=bool)
    for back in range(1, min(max_match, last)):
        alive &= ends >= back
        alive[alive] = tokens[ends[alive] - back] == tokens[last - back]
        if not alive.any():
            break
        matched += alive
    best = int(matched.max())
    end = int(ends[np.flatnonzero(matched == best)[-1]])  # the most recent of the longest matches
    count = min(max_tokens, per_match * best)
    return tuple(int(t) for t in tokens[end + 1 : end + 1 + count])
