"""Suffix drafting: the most frequent continuation of the context's suffix, in this sequence and in recent ones.

Why it exists: prompt lookup (``ngram``) only copies the sequence's own context. Served traffic repeats
itself across requests too (the same code edited again, agents' boilerplate, templated answers):
SuffixDecoding (Oliaro et al. 2024; Arctic Inference) keeps a suffix index over each request's own tokens
and over a bounded cache of recently generated outputs, and speculates the continuation the index has seen
most often. This is that, with the index bounded to suffixes of at most ``depth`` tokens:

* per sequence, for every suffix of length 1..depth ending at each position, the counts of the token that
  followed (updated as the context grows: O(depth) per token);
* process-wide, the same counts over finished sequences' outputs (`SuffixCache`): bounded to
  ``max_entries`` suffixes, least recently used first out, and entries unused for ``ttl_s`` age out;
* a proposal walks greedily: at each step the longest suffix of (context + tokens proposed so far) that
  either index knows, its most frequent next token, and a running score (the product of each step's
  frequency share). It stops when the score drops below ``min_score`` (the index is unsure), or when it has
  proposed ``spec_factor`` times as many tokens as the context's own match is long (short matches earn
  short proposals). Defaults measured offline on the benchmark's greedy code-edit and HumanEval outputs
  (bench/README.md, "Design measurements"): a one-token match and 4 tokens per matched token proposed
  most per round.

Deterministic proposals: q is one-hot, exact under any sampling settings.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from draft_service.drafters.base import DraftRequest, DraftSequence
from specdec.proposal import Proposal

NAME = "suffix"
Counts = dict[int, int]
# An estimate of one cache entry's bytes (CPython 3.11, 64-bit): the OrderedDict slot and its link (~100),
# the key tuple (40 + 8 per token), its counts dict (~220) and the cache's age stamp.
_ENTRY_BYTES = 380
_KEY_TOKEN_BYTES = 8


def _count(table: dict[tuple[int, ...], Counts], key: tuple[int, ...], token: int) -> None:
    counts = table.get(key)
    if counts is None:
        table[key] = {token: 1}
    else:
        counts[token] = counts.get(token, 0) + 1


class SuffixCache:
    """Suffix -> next-token counts over recently finished outputs, shared by every sequence. Thread-safe."""

    def __init__(self, depth: int, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if depth < 1 or max_entries < 0 or ttl_s <= 0:
            raise ValueError("need depth >= 1, max_entries >= 0 and ttl_s > 0")
        self.depth, self.max_entries, self.ttl_s = depth, max_entries, ttl_s
        self._clock = clock
        self._entries: OrderedDict[tuple[int, ...], tuple[Counts, float]] = OrderedDict()  # oldest use first
        self._key_tokens = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def approx_bytes(self) -> int:
        with self._lock:
            return len(self._entries) * _ENTRY_BYTES + self._key_tokens * _KEY_TOKEN_BYTES

    def add(self, tokens: list[int], start: int) -> None:
        """Count every transition into ``tokens[start:]`` (an output), its suffixes reaching back freely."""
        if not self.max_entries:
            return
        now = self._clock()
        with self._lock:
            for position in range(max(start, 1), len(tokens)):
                for n in range(1, min(self.depth, position) + 1):
                    key = tuple(tokens[position - n : position])
                    found = self._entries.pop(key, None)
                    if found is None:
                        counts: Counts = {}
                        self._key_tokens += n
                    else:
                        counts = found[0]
                    counts[tokens[position]] = counts.get(tokens[position], 0) + 1
                    self._entries[key] = (counts, now)
            self._shrink_locked(now)

    def counts(self, key: tuple[int, ...]) -> Counts | None:
        """The counts after ``key`` (a copy), marking the entry used; None if unknown."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            self._entries[key] = (found[0], self._clock())
            self._entries.move_to_end(key)
            return dict(found[0])

    def _shrink_locked(self, now: float) -> None:
        while self._entries:
            key, (_, used) = next(iter(self._entries.items()))
            if len(self._entries) <= self.max_entries and now - used <= self.ttl_s:
                return
            del self._entries[key]
            self._key_tokens -= len(key)


@dataclass
class _Index:
    counts: dict[tuple[int, ...], Counts] = field(default_factory=dict)  # this sequence's own transitions
    indexed: int = 0  # tokens of the context already counted


class SuffixDrafter:
    """Greedy most-frequent continuation over this sequence's suffix index and the shared `SuffixCache`."""

    name = NAME

    def __init__(self, cache: SuffixCache, min_score: float = 0.3, spec_factor: float = 4.0, min_match: int = 1) -> None:
        if not 0 <= min_score <= 1 or spec_factor <= 0 or min_match < 1:
            raise ValueError("need 0 <= min_score <= 1, spec_factor > 0 and min_match >= 1")
        self.cache, self.depth = cache, cache.depth
        self.min_score, self.spec_factor, self.min_match = min_score, spec_factor, min_match

    def propose(self, request: DraftRequest) -> Proposal:
        own = self._index(request.sequence).counts
        context = list(request.sequence.tokens[-self.depth :])
        proposed: list[int] = []
        score, budget = 1.0, request.num_draft_tokens
        while len(proposed) < budget:
            match = self._longest_match(own, context)
            if match is None:
                break
            length, counts = match
            if not proposed:  # the context's own match decides how far to trust the index
                if length < self.min_match:
                    break
                budget = min(budget, int(self.spec_factor * length))
            token, count = max(counts.items(), key=lambda item: (item[1], -item[0]))  # ties: the lower id
            score *= count / sum(counts.values())
            if score < self.min_score:
                break
            proposed.append(token)
            context.append(token)
        return Proposal(tuple(proposed), None, len(request.sequence.tokens))

    def finish(self, sequence: DraftSequence) -> None:
        """Drop the sequence's own index; its output joins the shared cache (whichever drafter served it)."""
        sequence.states.pop(self.name, None)
        self.cache.add(sequence.tokens, sequence.prompt_length)

    def _longest_match(self, own: dict[tuple[int, ...], Counts], context: list[int]) -> tuple[int, Counts] | None:
        for n in range(min(self.depth, len(context)), 0, -1):
            key = tuple(context[-n:])
            local, shared = own.get(key), self.cache.counts(key)
            if local is None and shared is None:
                continue
            merged = dict(shared or {})
            for token, count in (local or {}).items():
                merged[token] = merged.get(token, 0) + count
            return n, merged
        return None

    def _index(self, sequence: DraftSequence) -> _Index:
        index = sequence.states.get(self.name)
        if index is None or index.indexed > sequence.unchanged:
            index = sequence.states[self.name] = _Index()
        tokens = sequence.tokens
        for position in range(max(index.indexed, 1), len(tokens)):
            for n in range(1, min(self.depth, position) + 1):
                _count(index.counts, tuple(tokens[position - n : position]), tokens[position])
        index.indexed = len(tokens)
        return index
